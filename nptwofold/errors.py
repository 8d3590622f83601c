"""How a script ends when it cannot go on: a user's mistake (bad data, flags, files) raises
`NptwofoldError`, whose message the script prints as one line; a Ctrl-C ends it with one line
too (`run_script`). Neither ends in a traceback.
"""
import sys


class NptwofoldError(Exception):
    """A problem with the user's input, files or configuration, with a one-line message."""


def run_script(main, interrupted="interrupted"):
    """Runs a script's `main()`; a Ctrl-C anywhere in it prints `interrupted` and exits with
    130, the status a shell gives a command that SIGINT ended."""
    try:
        main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
