"""Train ResNet-20 on CIFAR-10 with nptwofold (NumPy + Numba, no deep-learning framework).

Presets: quick (embedded sample, minutes), short (full CIFAR-10, 10 epochs), paper (He et al.
2016, 182 epochs), twofold (baseline -> Twofold Sparsity training -> post-training, in
OUT/baseline, OUT/twofold, OUT/post). Flags override the preset. Every epoch writes
OUT/last.h5 (and best.h5), log.csv, log.json and summary.json; --resume continues a run.
Any Twofold flag (--sparsity, --bits, ...) turns a run into Twofold training; start it from a
trained baseline with --init CKPT.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

from nptwofold.options import (ScriptParser, add_flags, flag_name, given_values,  # noqa: E402
                               threads_flag)

# the twofold preset sets its phases' schedules: of the training flags it takes only these
PIPELINE_TRAIN_FLAGS = ("data", "seed", "init")


def parse_args(argv=None):
    from nptwofold.config import PRESETS, PipelineConfig, TrainConfig
    from nptwofold.twofold import TwofoldConfig

    parser = ScriptParser(__doc__)
    parser.add_argument("--preset", default="quick", choices=[*PRESETS, "twofold"],
                        help="settings the flags below override (default: quick)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default: 2)")
    parser.add_argument("--out", help="output folder (default: runs/<preset>-seed<seed>)")
    parser.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                        help="continue OUT/last.h5, or the given checkpoint (default: start a "
                        "new run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    training = parser.add_argument_group("training (the default shown is the quick preset's)")
    add_flags(training, TrainConfig)
    method = parser.add_argument_group(
        "Twofold Sparsity (SPEC sections 3-4); any of these makes the run a twofold one")
    add_flags(method, TwofoldConfig)
    add_flags(method, PipelineConfig)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1 (got {args.threads})")
    pipeline_given = given_values(args, PipelineConfig)
    if args.preset == "twofold":
        refused = set(given_values(args, TrainConfig)) - set(PIPELINE_TRAIN_FLAGS)
        if refused:
            parser.error("the twofold preset sets its phases' schedules; drop "
                         + ", ".join(flag_name(name) for name in sorted(refused)))
    elif pipeline_given:
        parser.error(", ".join(map(flag_name, pipeline_given)) + " belong to --preset twofold")
    return args


def phase_configs(args, out_dir):
    """[(phase folder, TrainConfig)]: one run, or the three phases of the twofold preset."""
    from nptwofold.config import TWOFOLD_PHASES, PipelineConfig, TrainConfig
    from nptwofold.twofold import TwofoldConfig

    twofold = given_values(args, TwofoldConfig)
    if args.preset != "twofold":
        return [(out_dir, TrainConfig.from_preset(args.preset, **given_values(args, TrainConfig),
                                                  twofold=twofold or None))]
    pipeline = PipelineConfig(**given_values(args, PipelineConfig)).validated()
    phase_epochs = {"twofold": pipeline.twofold_epochs, "post": pipeline.finetune_epochs}
    phases, init = [], args.init
    for name, preset, settings in TWOFOLD_PHASES:
        if name == "baseline" and args.init:
            continue  # --init is the trained baseline
        settings = {**settings, **given_values(args, TrainConfig), "init": init}
        if name != "baseline":
            settings["twofold"] = twofold  # {} = twofold with every default
            settings["epochs"] = phase_epochs[name]
        if name == "post" and pipeline.finetune_beta_bit is not None:
            settings["twofold"] = {**twofold, "beta_bit": pipeline.finetune_beta_bit}
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
    configure_threads(threads_flag(argv))
    args = parse_args(argv)
    from nptwofold.config import PipelineConfig, TrainConfig
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_dir
    from nptwofold.twofold import TwofoldConfig

    try:
        out_dir = Path(args.out or f"runs/{args.preset}-seed{args.seed or 0}")
        overrides = [name for cls in (TrainConfig, TwofoldConfig, PipelineConfig)
                     for name in given_values(args, cls)]
        if args.resume and args.preset != "twofold" and overrides:
            raise NptwofoldError("--resume continues the saved run's config; drop "
                                 + ", ".join(map(flag_name, overrides)))
        phases = phase_configs(args, out_dir)
        if args.resume and len(phases) > 1 and not any(
                (phase_dir / "last.h5").exists() for phase_dir, _ in phases):
            raise NptwofoldError(f"nothing to resume in {out_dir}: no phase has a last.h5 "
                                 "(drop --resume to start the pipeline)")
        for phase_dir, _ in phases:
            check_output_dir(phase_dir)
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
