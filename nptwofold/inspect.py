"""List what an nptwofold HDF5 checkpoint holds: `python -m nptwofold.inspect CKPT`.

Prints the file attributes, the run config and every dataset with shape, dtype and a value
summary, reading the file with plain h5py so it shows exactly what other tools see.
"""
import argparse
import json
import sys

import h5py
import numpy as np


def describe(path, out=sys.stdout):
    with h5py.File(path, "r") as f:
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        describe(args.checkpoint)
    except OSError as exc:
        sys.exit(f"error: cannot read {args.checkpoint}: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main()
