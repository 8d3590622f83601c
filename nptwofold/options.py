"""Options declared once: a dataclass field carries its help text and allowed values, and the
command-line flags, their validation, the checkpoint config and the sweep's pass-through are
all derived from it.

    lr: float = option(0.1, "peak learning rate", above(0))

makes `--lr` (type float, help with its default), refuses `--lr -1` with
"--lr must be > 0 (got -1.0)", and is stored by name in the checkpoint's JSON config.
Field types are int, float, bool, str, list[int], list[float] and nested configs; a None
default means "optional". A field declared with flag=False has no flag of its own (a nested
config, or a hardware constant set with `--hw KEY=VALUE`), and its messages use its name.
"""
import argparse
import dataclasses
import math
import sys
import types
import typing

from . import __version__
from .errors import NptwofoldError


# Upper bounds that stop a batch size from exhausting the memory, with a one-line error instead
# of an allocation failure: a training step keeps about 1.5 MB of activations per image
# (measured: 160 MB at 64 images, 456 MB at 256), so 4096 images need about 6 GB, 32 times
# the presets' batch; inference keeps no activations (a simulated CIM batch of 200 images
# peaked at 300 MB in all), and 10,000 is the whole CIFAR-10 test set.
MAX_BATCH_SIZE = 4096
MAX_EVAL_BATCH_SIZE = 10_000


class Bound(typing.NamedTuple):
    """An allowed numeric range, with the text the error messages use."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value):
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        return above_low and below_high  # false for NaN

    def __str__(self):
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


def at_least(low):
    return Bound(low)


def above(low):
    return Bound(low, low_open=True)


def between(low, high, high_open=False):
    return Bound(low, high, high_open=high_open)


def option(default, help, bound=None, choices=None, flag=True, check=None):
    """A dataclass field with its help text, numeric `bound` or `choices`, and an extra
    `check(value)` that raises NptwofoldError with the reason (e.g. "is odd")."""
    metadata = dict(help=help, bound=bound, choices=choices, flag=flag, check=check)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    if dataclasses.is_dataclass(default):  # a nested config: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name):
    return "--" + name.replace("_", "-")


def _base_type(field):
    """(type of one value, is a list) of a field annotated T, T | None or list[T]."""
    kind = field.type
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is list:
        return typing.get_args(kind)[0], True
    return kind, False


def _checked_value(field, value, kind=None):
    """`value` converted to the field's type (an int is a valid float), or NptwofoldError.
    `kind` is given for the items of a list field."""
    name = flag_name(field.name) if field.metadata.get("flag") else field.name
    if value is None and field.default is None and kind is None:
        return None
    if kind is None:
        kind, is_list = _base_type(field)
        if is_list:
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list):
                raise NptwofoldError(f"{name} must be a list of {kind.__name__} "
                                     f"(got {value!r})")
            value = [_checked_value(field, item, kind) for item in value]
            kind = list
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, kind):
            raise NptwofoldError(f"{field.name} must be a JSON object (got {value!r})")
        return check_fields(value)
    if kind is not list:
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}[kind]
        if not ok(value):
            raise NptwofoldError(f"{name} must be {'an' if kind is int else 'a'} "
                                 f"{kind.__name__} (got {value!r})")
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise NptwofoldError(f"{name} must be a finite number (got {value})")
        bound, choices = field.metadata.get("bound"), field.metadata.get("choices")
        if bound is not None and value not in bound:
            raise NptwofoldError(f"{name} must be {bound} (got {value!r})")
        if choices is not None and value not in choices:
            raise NptwofoldError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    check = field.metadata.get("check")
    if check is not None and (kind is list or not _base_type(field)[1]):
        try:
            check(value)  # on the whole value: a list's check sees the list
        except NptwofoldError as exc:
            raise NptwofoldError(f"{name} {value!r}: {exc}") from None
    return value


def check_fields(instance):
    """Checks every declared field's type and range (nested configs too), converting ints
    given for floats."""
    for field in dataclasses.fields(instance):
        if "help" in field.metadata:
            setattr(instance, field.name, _checked_value(field, getattr(instance, field.name)))
    return instance


def known_fields(cls, saved):
    """The entries of dict `saved` that are fields of `cls` (others, from other versions,
    are ignored)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {key: value for key, value in saved.items() if key in names}


def shown_value(value):
    """A value as --help shows it: lists space-separated; None, "" and [] as "none"."""
    if value is None or value == "" or value == []:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def add_flags(parser, cls, skip=(), shown_defaults=None):
    """One flag per declared field of `cls` (except `skip`), each with default None, so that
    a given flag can be told from an absent one. `shown_defaults` ({field: text}) replaces the
    default the help text shows, e.g. with each preset's value."""
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag") or field.name in skip:
            continue
        kind, is_list = _base_type(field)
        default = (field.default if field.default_factory is dataclasses.MISSING
                   else field.default_factory())
        shown = (shown_defaults or {}).get(field.name, shown_value(default))
        settings = dict(help=f"{field.metadata['help']} (default: {shown})", default=None)
        if kind is bool:
            settings["action"] = argparse.BooleanOptionalAction
        else:
            settings.update(type=kind, metavar=field.name.upper())
            if is_list:
                settings["nargs"] = "*"
            if field.metadata.get("choices"):
                settings.update(choices=field.metadata["choices"], metavar=None)
        parser.add_argument(flag_name(field.name), **settings)


def given_values(args, cls, skip=()):
    """{field: value} of the flags of `cls` given on the command line."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
            if field.metadata.get("flag") and field.name not in skip
            and getattr(args, field.name, None) is not None}


def to_argv(values):
    """Command-line arguments that give `values` ({field: value}) back, for a child run."""
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        elif isinstance(value, list):
            argv += [flag_name(name), *map(str, value)]
        else:
            argv += [flag_name(name), str(value)]
    return argv


def threads_flag(argv=None, default=2):
    """The --threads value, read before NumPy loads (the thread pools read it once); the full
    parser reports a bad value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", default=str(default))
    value = pre.parse_known_args(argv)[0].threads
    return int(value) if value.isdigit() and int(value) >= 1 else default


class ScriptParser(argparse.ArgumentParser):
    """argparse with `--version`, one-line errors ("error: ...", exit status 2), and help text
    that every argument must have: a flag whose help does not state its default gets
    "(default: VALUE)" or "(default: none)" appended, so `--help` always shows what an
    omitted flag means."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.add_argument("--version", action="version", version=f"nptwofold {__version__}")

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:  # groups share this list, so their flags are here too
            if action.help is argparse.SUPPRESS or isinstance(
                    action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if not action.help:
                raise TypeError(f"{'/'.join(action.option_strings) or action.dest} has no help")
            default = action.default
            states_default = "default" in action.help or action.required
            if (not action.option_strings or states_default or action.nargs == 0
                    or default is argparse.SUPPRESS):
                continue  # positional, stated, required or an on/off switch
            shown = shown_value(list(default) if isinstance(default, tuple) else default)
            action.help = f"{action.help} (default: {shown})"
        return super().parse_known_args(args, namespace)

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)
