"""Code the tests share: the repository root, running a script as a user would (or from a
terminal, for Ctrl-C), the one-line error every bad input must end in, and a copy of a model's
arrays. Test modules import from here, never from each other."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args, check=True):
    """Runs `python ARGS...` from the repository root; raises with its output if it fails."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def as_from_a_terminal(argv, before=""):
    """The command line that runs script argv[0] with arguments argv[1:] and Python's own
    Ctrl-C handler, as a terminal would start it (a shell that runs the tests in the background
    may have made its children ignore SIGINT); `before` is code run first, after the
    repository is on the import path."""
    code = ("import runpy, signal, sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"{before}\n"
            f"sys.argv = {list(map(str, argv))!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", code]


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], result.stderr


def state_of(model):
    return {name: value.copy() for name, value in model.state_arrays()}


def twofold_of(model, seed=0, **settings):
    """The Twofold state of `model` for settings of `TwofoldConfig` and `HardwareConfig`
    together (each key goes to the config that declares it)."""
    import dataclasses

    from nptwofold.hardware import HardwareConfig
    from nptwofold.twofold import Twofold, TwofoldConfig

    array = {field.name for field in dataclasses.fields(HardwareConfig)}
    hardware = HardwareConfig(**{key: value for key, value in settings.items() if key in array})
    config = TwofoldConfig(**{key: value for key, value in settings.items() if key not in array})
    return Twofold(model, config, seed, hardware)
