"""User-facing error type: anything a user can cause (bad data, flags, files) raises this.

Scripts catch it and print its message as one line, so a mistake never ends in a traceback.
"""


class NptwofoldError(Exception):
    """A problem with the user's input, files or configuration, with a one-line message."""
