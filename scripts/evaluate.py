"""Test accuracy and loss of a checkpoint: `python scripts/evaluate.py CKPT [--data PATH] [--json]`."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)
from nptwofold.options import MAX_EVAL_BATCH_SIZE, ScriptParser, threads_flag  # noqa: E402


def main(argv=None):
    configure_threads(threads_flag(argv))
    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="an nptwofold HDF5 checkpoint")
    parser.add_argument("--data", help="CIFAR-10 tarball or folder, 'sample' or 'cifar10' "
                        "(default: the data the checkpoint was trained on)")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="evaluation batch size (default: 500)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the engine's pool (default: 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("threads", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.batch_size > MAX_EVAL_BATCH_SIZE:
        parser.error(f"--batch-size must be <= {MAX_EVAL_BATCH_SIZE} (got {args.batch_size})")
    from nptwofold.data import load_dataset
    from nptwofold.errors import NptwofoldError
    from nptwofold.build import load_model
    from nptwofold.steps import evaluate

    try:
        model, _, content = load_model(args.checkpoint)
        dataset = load_dataset(args.data or content["config"].get("data", "cifar10"))
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    loss, accuracy = evaluate(model, dataset.test_images, dataset.test_labels, args.batch_size,
                              progress=not args.json)
    result = dict(accuracy=accuracy, loss=loss, n=len(dataset.test_labels))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.checkpoint}: test accuracy {accuracy:.4f}, loss {loss:.4f} "
              f"on {result['n']} images from {dataset.source}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
