"""Write a checkpoint's model as a compact checkpoint: `python scripts/export_model.py CKPT OUT`.

The compact file holds what the model computes with and nothing to train on: a Twofold model's
mapped layers as integer levels (int8, int16 above 8 bits) with their scale, LFSR mask
parameters and dropped planes; a float model's weights as float32; batch norm, the FC bias and
the run config; no optimizer or training state, no float bit planes (docs/checkpoint-format.md).
`evaluate.py`, `cim_eval.py` and `python -m nptwofold.inspect` read it as they read CKPT, with
the same results; `train_cifar.py --init OUT` fine-tunes from it. A Twofold model must be
finished (hard-pruned and re-binarized, as a run's post/last.h5 is).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser  # noqa: E402


def main(argv=None):
    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="an nptwofold checkpoint (full or compact)")
    parser.add_argument("out", help="the compact checkpoint to write")
    args = parser.parse_args(argv)
    from nptwofold.build import load_model
    from nptwofold.checkpoint import save_compact
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_file

    source, out = Path(args.checkpoint), Path(args.out)
    try:
        check_output_file(out)
        if out.exists() and source.exists() and out.samefile(source):
            raise NptwofoldError(f"{out} is the checkpoint being exported; give another name")
        model, method, content = load_model(source)
        save_compact(out, model, content["config"], method)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {out}: {out.stat().st_size / 1024:.0f} KiB "
          f"({source.stat().st_size / 1024:.0f} KiB in {source})")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
