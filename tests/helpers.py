"""Code the tests share: the repository root, running a script as a user would, the one-line
error every bad input must end in, and a copy of a model's arrays. Test modules import from
here, never from each other."""
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
