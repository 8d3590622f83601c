"""List what an nptwofold HDF5 checkpoint holds: `python -m nptwofold.inspect CKPT`.

Prints the file attributes, the run config and every dataset with shape, dtype and a value
summary, reading the file with plain h5py so it shows exactly what other tools see. A file that
reaches outside itself (links, external or virtual storage) or declares a dataset larger than a
checkpoint holds is refused before any data is read, as `load_checkpoint` refuses it.
"""
import json
import sys

import h5py
import numpy as np

from .checkpoint import check_checkpoint_file, check_self_contained
from .errors import NptwofoldError
from .options import ScriptParser


def describe(path, out=sys.stdout):
    with h5py.File(path, "r") as f:
        check_self_contained(f, path)
        for key, value in f.attrs.items():
            if key == "config":
                out.write("config:\n")
                for name, setting in json.loads(value).items():
                    out.write(f"  {name} = {setting}\n")
            else:
                out.write(f"{key}: {value}\n")

        def visit(name, node):
            if isinstance(node, h5py.Group):
                out.write(f"/{name}/\n")
                for key, value in node.attrs.items():
                    text = str(value)
                    out.write(f"  @{key} = {text[:70] + '...' if len(text) > 70 else text}\n")
                return
            data = node[()]
            summary = ""
            if data.size and np.issubdtype(data.dtype, np.number):
                summary = f"  min {data.min():.4g} max {data.max():.4g} mean {data.mean():.4g}"
            out.write(f"  {name.split('/', 1)[-1]:<32} {str(data.shape):<16} {data.dtype}{summary}\n")

        f.visititems(visit)


def main(argv=None):
    parser = ScriptParser(__doc__, prog="python -m nptwofold.inspect")
    parser.add_argument("checkpoint", help="an HDF5 checkpoint")
    args = parser.parse_args(argv)
    try:
        describe(check_checkpoint_file(args.checkpoint))
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    except Exception as exc:  # h5py reports a damaged file with many exception types
        sys.exit(f"error: cannot read {args.checkpoint}: truncated or corrupt HDF5 "
                 f"({type(exc).__name__})")


if __name__ == "__main__":
    main()
