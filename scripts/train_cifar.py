"""Train ResNet-20 on CIFAR-10 with nptwofold (NumPy + Numba, no deep-learning framework).

Presets: quick (embedded sample, minutes), short (full CIFAR-10, 10 epochs),
paper (He et al. 2016, 182 epochs). Flags override the preset. Every epoch writes
OUT/last.h5 (and best.h5), log.csv, log.json and summary.json; --resume continues a run.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

OVERRIDES = {  # flag -> TrainConfig field
    "data": "data", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "momentum": "momentum", "nesterov": "nesterov", "weight_decay": "weight_decay",
    "schedule": "schedule", "warmup_epochs": "warmup_epochs", "seed": "seed",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=["quick", "short", "paper"])
    parser.add_argument("--data", help="CIFAR-10 tarball or folder (binary or python version); "
                        "'sample' = embedded slice, 'cifar10' = datasets/ or download")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--schedule", choices=["cosine", "step"])
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--out", help="output folder (default runs/<preset>-seed<seed>)")
    parser.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                        help="continue OUT/last.h5, or the given checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    from nptwofold.data import load_dataset
    from nptwofold.errors import NptwofoldError
    from nptwofold.train import TrainConfig, Trainer

    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items()
                 if getattr(args, flag) is not None}
    try:
        config = TrainConfig.from_preset(args.preset, **overrides)
        out_dir = Path(args.out or f"runs/{args.preset}-seed{config.seed}")
        if args.resume:
            if overrides:
                raise NptwofoldError("--resume continues the saved run's config; drop "
                                     + ", ".join("--" + f.replace("_", "-") for f in overrides))
            ckpt = out_dir / "last.h5" if args.resume == "last" else Path(args.resume)
            from nptwofold.checkpoint import load_checkpoint
            dataset = load_dataset(load_checkpoint(ckpt)["config"]["data"])
            trainer = Trainer.resume(ckpt, dataset, out_dir, progress=not args.no_progress)
            print(f"resuming {ckpt} at epoch {trainer.state['epoch'] + 1}, "
                  f"step {trainer.state['step']}")
        else:
            if (out_dir / "last.h5").exists():
                raise NptwofoldError(f"{out_dir} already holds a run; pass --resume to continue "
                                     "it or --out to start elsewhere")
            dataset = load_dataset(config.data)
            trainer = Trainer(config, dataset, out_dir, progress=not args.no_progress)
        print(f"data: {len(dataset.train_labels)} train / {len(dataset.test_labels)} test images "
              f"from {dataset.source}; output: {out_dir}")
        state = trainer.run()
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
    history = state["history"]
    print(f"done: final test accuracy {history[-1]['test_acc']:.4f}, best "
          f"{state['best_accuracy']:.4f} (epoch {state['best_epoch']}); logs in {out_dir}")


if __name__ == "__main__":
    main()
