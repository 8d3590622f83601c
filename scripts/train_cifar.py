"""Train ResNet-20 on CIFAR-10 with nptwofold (NumPy + Numba, no deep-learning framework).

Presets: quick (embedded sample, minutes), short (full CIFAR-10, 10 epochs), paper (He et al.
2016, 182 epochs), twofold (baseline -> Twofold Sparsity training -> post-training, in
OUT/baseline, OUT/twofold, OUT/post). Flags override the preset. Every epoch writes
OUT/last.h5 (and best.h5), log.csv, log.json and summary.json; --resume continues a run.
Any Twofold flag (--sparsity, --bits, ...) turns a run into Twofold training; start it from a
trained baseline with --init CKPT.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

TRAIN_FLAGS = ("data", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
               "schedule", "warmup_epochs", "seed", "init", "post_training")
TWOFOLD_FLAGS = ("sparsity", "bits", "lambda_net", "beta_bit", "reg_bit_form",
                 "plane_drop_tolerance", "plane_drop_images", "mask_group", "lfsr_seed",
                 "rebinarize_epochs")
PIPELINE_FLAGS = ("data", "seed", "init", "twofold_epochs", "finetune_epochs",
                  "finetune_beta_bit")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=["quick", "short", "paper", "twofold"])
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
    method = parser.add_argument_group("Twofold Sparsity (SPEC sections 3-4)")
    method.add_argument("--init", metavar="CKPT", help="start from this checkpoint's model")
    method.add_argument("--sparsity", type=float, help="network sparsity p in [0, 1)")
    method.add_argument("--bits", type=int, help="weight bits b (even, 2..16; default 8)")
    method.add_argument("--lambda-net", type=float, help="Reg_Net strength")
    method.add_argument("--beta-bit", type=float, help="Reg_Bit strength")
    method.add_argument("--reg-bit-form", choices=["poster", "plane_lasso"])
    method.add_argument("--plane-drop-tolerance", type=float, metavar="NATS",
                        help="post-training: after hard pruning, drop low bit planes while "
                             "the loss on the check images rises by at most NATS (default 0 = "
                             "never)")
    method.add_argument("--plane-drop-images", type=int, help="check images (default 500)")
    method.add_argument("--mask-group", type=int, help="columns sharing one LFSR index set")
    method.add_argument("--lfsr-seed", type=int, help="base LFSR seed (0 = from --seed)")
    method.add_argument("--rebinarize-epochs", type=int, nargs="+", metavar="E")
    method.add_argument("--post-training", action="store_true", default=None,
                        help="hard-prune and re-binarize --init's twofold model, then fine-tune")
    method.add_argument("--twofold-epochs", type=int, help="twofold preset: twofold phase epochs")
    method.add_argument("--finetune-epochs", type=int, help="twofold preset: post-training epochs")
    method.add_argument("--finetune-beta-bit", type=float,
                        help="twofold preset: Reg_Bit strength of the fine-tune (default "
                             "--beta-bit; 0 lets it recover accuracy, as BSQ fine-tunes)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    given = {name for name, value in vars(args).items() if value is not None}
    if args.preset == "twofold":
        refused = given & (set(TRAIN_FLAGS) - set(PIPELINE_FLAGS))
        if refused:
            parser.error("the twofold preset sets its phases' schedules; drop "
                         + ", ".join("--" + f.replace("_", "-") for f in sorted(refused)))
    elif given & {"twofold_epochs", "finetune_epochs", "finetune_beta_bit"}:
        parser.error("--twofold-epochs, --finetune-epochs and --finetune-beta-bit belong to "
                     "--preset twofold")
    return args


def phase_configs(args, out_dir):
    """[(phase folder, TrainConfig)]: one run, or the three phases of the twofold preset."""
    from nptwofold.config import TWOFOLD_PHASES, TrainConfig

    def chosen(names):
        return {name: getattr(args, name) for name in names if getattr(args, name) is not None}

    twofold = chosen(TWOFOLD_FLAGS) or None
    if args.preset != "twofold":
        return [(out_dir, TrainConfig.from_preset(args.preset, **chosen(TRAIN_FLAGS),
                                                  twofold=twofold))]
    phase_epochs = {"twofold": args.twofold_epochs, "post": args.finetune_epochs}
    phases, init = [], args.init
    for name, preset, settings in TWOFOLD_PHASES:
        if name == "baseline" and args.init:
            continue  # --init is the trained baseline
        settings = {**settings, **chosen(("data", "seed")), "init": init}
        if name != "baseline":
            settings["twofold"] = twofold or {}
        if name == "post" and args.finetune_beta_bit is not None:
            settings["twofold"] = {**settings["twofold"], "beta_bit": args.finetune_beta_bit}
        if phase_epochs.get(name) is not None:
            settings["epochs"] = phase_epochs[name]
        phases.append((out_dir / name, TrainConfig.from_preset(preset, **settings)))
        init = str(out_dir / name / "last.h5")
    return phases


def run_phase(config, phase_dir, resume_from, progress):
    """Trains one phase: from `resume_from` (a checkpoint) if given, else from the start."""
    from nptwofold.checkpoint import load_checkpoint
    from nptwofold.data import load_dataset
    from nptwofold.errors import NptwofoldError
    from nptwofold.train import Trainer

    if resume_from is not None:
        dataset = load_dataset(load_checkpoint(resume_from)["config"]["data"])
        trainer = Trainer.resume(resume_from, dataset, phase_dir, progress=progress)
        print(f"resuming {resume_from} at epoch {trainer.state['epoch'] + 1}, "
              f"step {trainer.state['step']}")
    else:
        if (phase_dir / "last.h5").exists():
            raise NptwofoldError(f"{phase_dir} already holds a run; pass --resume to continue "
                                 "it or --out to start elsewhere")
        dataset = load_dataset(config.data)
        print(f"data: {len(dataset.train_labels)} train / {len(dataset.test_labels)} test images "
              f"from {dataset.source}; output: {phase_dir}")
        trainer = Trainer(config, dataset, phase_dir, progress=progress)
    trainer.run()


def phase_finished(phase_dir, config):
    summary = phase_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["epochs_done"] >= config.epochs


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    from nptwofold.errors import NptwofoldError

    try:
        out_dir = Path(args.out or f"runs/{args.preset}-seed{args.seed or 0}")
        overrides = [f for f in TRAIN_FLAGS + TWOFOLD_FLAGS if getattr(args, f) is not None]
        if args.resume and args.preset != "twofold" and overrides:
            raise NptwofoldError("--resume continues the saved run's config; drop "
                                 + ", ".join("--" + f.replace("_", "-") for f in overrides))
        phases = phase_configs(args, out_dir)
        for phase_dir, config in phases:
            resume_from = None
            if args.resume and len(phases) > 1:  # the pipeline: skip, continue or start a phase
                if phase_finished(phase_dir, config):
                    print(f"{phase_dir}: finished earlier, skipped")
                    continue
                if (phase_dir / "last.h5").exists():
                    resume_from = phase_dir / "last.h5"
            elif args.resume:
                resume_from = phase_dir / "last.h5" if args.resume == "last" else Path(args.resume)
            run_phase(config, phase_dir, resume_from, progress=not args.no_progress)
        final = json.loads((phases[-1][0] / "summary.json").read_text())
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"done: final test accuracy {final['final_test_acc']:.4f}, best "
          f"{final['best_test_acc']:.4f} (epoch {final['best_epoch']}); logs in {out_dir}")
    post = final.get("post_training")
    if post:
        print(f"post-training: test accuracy {post['accuracy_before']:.4f} before, "
              f"{post['accuracy_after_prune']:.4f} after hard pruning"
              + (f", dropping {post['planes_dropped']} bit planes" if "planes_dropped" in post
                 else "")
              + f" and re-binarization, {final['final_test_acc']:.4f} after fine-tuning")


if __name__ == "__main__":
    main()
