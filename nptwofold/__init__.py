"""nptwofold: Twofold Sparsity (LFSR network pruning + bit-level sparsity) on plain CPUs.

NumPy + Numba kernels live in `nptwofold.kernels`; layers, the ResNet-20 model, data loading,
checkpoints and training each have their own module.

Importing the package first checks that its dependencies are installed, without importing them
(the scripts set the thread pools before NumPy loads): a missing one ends in one line naming it
and the command that installs it, instead of a traceback from deep inside an import.
"""
import importlib.util
import shlex
import sys
from pathlib import Path

__version__ = "0.1.0"

REQUIRED_PACKAGES = ("numpy", "numba", "h5py", "tqdm")


def _missing_packages_message(missing):
    """The one line that says what is missing and the command that fixes it here."""
    repo = Path(__file__).resolve().parent.parent
    venv = repo / ".venv"
    source = f"-e {shlex.quote(str(repo))}" if (repo / "setup.cfg").is_file() else " ".join(missing)
    them = "them" if len(missing) > 1 else "it"
    fix = f"install {them}: {shlex.quote(sys.executable)} -m pip install {source}"
    if (venv / "bin/python").exists() and Path(sys.prefix).resolve() != venv.resolve():
        fix = (f"activate the project's virtual environment (source "
               f"{shlex.quote(str(venv / 'bin/activate'))}) or {fix}")
    return f"error: nptwofold needs {', '.join(missing)}, which {sys.executable} lacks; {fix}"


_missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(_missing_packages_message(_missing))
