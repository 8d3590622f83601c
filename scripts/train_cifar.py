"""Train ResNet-20 on CIFAR-10 with nptwofold (NumPy + Numba, no deep-learning framework).

Presets: quick (embedded sample, minutes), short (full CIFAR-10, 10 epochs), long (short's
schedule over 150 epochs), paper (He et al. 2016, 182 epochs), twofold (baseline -> Twofold Sparsity training -> post-training, in
OUT/baseline, OUT/twofold, OUT/post). Flags override the preset. Every epoch writes
OUT/last.h5 (and best.h5), log.csv, log.json and summary.json; --resume continues a run,
--resume --epochs N trains it to N epochs in all.
Any Twofold flag (--sparsity, --beta-bit, ...) turns a run into Twofold training; start it
from a trained baseline with --init CKPT. The array flags (--weight-bits, --weight-encoding,
--hw ...) say what the model is made for: the bit planes follow them, the energy regularizer
prices them, and the checkpoint stores them for scripts/cim_eval.py.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

from nptwofold.options import (ScriptParser, add_flags, flag_name, given_values,  # noqa: E402
                               shown_value, threads_flag)

# the twofold preset sets its phases' schedules: of the training flags it takes only these
PIPELINE_TRAIN_FLAGS = ("data", "seed", "init", "teacher", "distill_temperature",
                        "distill_weight")
# the flag behind a config field of a twofold-preset phase, where it is not the field's own
PHASE_FLAGS = {("twofold", "epochs"): "twofold_epochs", ("post", "epochs"): "finetune_epochs",
               ("twofold", "lr"): "twofold_lr", ("post", "lr"): "twofold_lr/--finetune-lr",
               ("post", "beta_bit"): "beta_bit/--finetune-beta-bit"}


def parse_args(argv=None):
    from nptwofold.config import PRESETS, PipelineConfig, TrainConfig, method_help
    from nptwofold.hardware import add_hardware_flags
    from nptwofold.twofold import TwofoldConfig

    parser = ScriptParser(__doc__)
    parser.add_argument("--preset", choices=[*PRESETS, "twofold"],
                        help="settings the flags below override (default: quick)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the engine's pool (default: 2)")
    parser.add_argument("--out", help="output folder (default: runs/<preset>-seed<seed>; with "
                        "--resume CKPT, CKPT's folder)")
    parser.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                        help="continue OUT/last.h5, or the given checkpoint (default: start a "
                        "new run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    training = parser.add_argument_group(
        "training (a preset sets these, a flag overrides it; the twofold preset takes only "
        + ", ".join(map(flag_name, PIPELINE_TRAIN_FLAGS)) + ", and its data is cifar10)")
    add_flags(training, TrainConfig, shown_defaults=preset_defaults())
    method = parser.add_argument_group(
        "Twofold Sparsity; any of these makes the run a twofold one",
        method_help())
    add_flags(method, TwofoldConfig)
    add_flags(method, PipelineConfig)
    add_hardware_flags(parser)
    args = parser.parse_args(argv)
    args.preset_given, args.preset = args.preset is not None, args.preset or "quick"
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


def preset_defaults():
    """{field: text} for the training flags whose value differs between presets, e.g.
    "quick: 15; short: 10; ...", so that --help shows what each preset uses."""
    from nptwofold.config import PRESETS, TrainConfig

    configs = {preset: TrainConfig.from_preset(preset) for preset in PRESETS}
    shown = {}
    for field in dataclasses.fields(TrainConfig):
        by_value = {}
        for preset, config in configs.items():
            by_value.setdefault(shown_value(getattr(config, field.name)), []).append(preset)
        if len(by_value) > 1:
            shown[field.name] = "; ".join(f"{', '.join(presets)}: {value}"
                                          for value, presets in by_value.items())
    return shown


def phase_configs(args, out_dir):
    """[(phase folder, TrainConfig)]: one run, or the three phases of the twofold preset; on
    --resume of one run its config is None (the checkpoint holds it)."""
    from nptwofold.config import TWOFOLD_PHASES, PipelineConfig, TrainConfig, with_method
    from nptwofold.hardware import given_hardware
    from nptwofold.twofold import TwofoldConfig

    twofold, hardware, pipeline = with_method(
        getattr(args, "method", None), given_values(args, TwofoldConfig), given_hardware(args),
        given_values(args, PipelineConfig))  # every phase is made for the same array
    if args.preset != "twofold":
        if args.resume:  # the run's config is the stored one (--epochs is applied to it)
            return [(out_dir, None)]
        return [(out_dir, TrainConfig.from_preset(args.preset, **given_values(args, TrainConfig),
                                                  twofold=twofold or None, hardware=hardware))]
    pipeline = PipelineConfig(**pipeline).validated()
    phase_epochs = {"twofold": pipeline.twofold_epochs, "post": pipeline.finetune_epochs}
    phases, init = [], args.init
    for name, preset, settings in TWOFOLD_PHASES:
        if name == "baseline" and args.init:
            continue  # --init is the trained baseline
        settings = {**settings, **given_values(args, TrainConfig), "init": init,
                    "hardware": hardware}
        if name != "baseline":
            settings["twofold"] = twofold  # {} = twofold with every default
            settings["epochs"] = phase_epochs[name]
            settings["lr"] = (pipeline.finetune_lr if name == "post"
                              and pipeline.finetune_lr is not None else pipeline.twofold_lr)
        if name == "post" and pipeline.finetune_beta_bit is not None:
            settings["twofold"] = {**twofold, "beta_bit": pipeline.finetune_beta_bit}
        phases.append((out_dir / name, TrainConfig.from_preset(preset, **settings)))
        # relative, as --init is given: a checkpoint's config holds no path of this machine
        init = os.path.relpath(out_dir / name / "last.h5")
    return phases


def run_phase(config, phase_dir, resume_from, progress, epochs=None, single_run=True,
              data=None):
    """Trains one phase: from `resume_from` (a checkpoint) if given, else from the start; a
    resumed run reads `data` if given, else the dataset its checkpoint names.
    `epochs` on a resume trains the run to that many epochs in all; a finished `single_run`
    (not a phase of the twofold preset) says how to train it longer."""
    from nptwofold.checkpoint import load_checkpoint
    from nptwofold.data import load_dataset
    from nptwofold.errors import NptwofoldError
    from nptwofold.train import Trainer

    if resume_from is not None:
        stored = load_checkpoint(resume_from)["config"]
        dataset = load_dataset(data or stored["data"])
        trainer = Trainer.resume(resume_from, dataset, phase_dir, progress=progress,
                                 epochs=epochs)
        state, total = trainer.state, trainer.config.epochs
        if state["epoch"] < total:
            print(f"resuming {resume_from} at epoch {state['epoch'] + 1} of {total}, "
                  f"step {state['step']}")
            if epochs is not None:
                print(extension_note(trainer, stored["epochs"]))
        else:  # its outputs were checked and rebuilt where missing
            longer = ("" if not single_run else
                      f"; to train it longer: --resume --epochs N with N > {total}"
                      if trainer.config.twofold is None else
                      f"; to train on from it: a new run with --init {resume_from}")
            print(f"{phase_dir}: finished earlier, skipped ({total} of {total} "
                  f"epochs{longer})")
    else:
        if (phase_dir / "last.h5").exists():
            raise NptwofoldError(f"{phase_dir} already holds a run; pass --resume to continue "
                                 "it (--resume --epochs N to train it longer) or --out DIR to "
                                 "start elsewhere")
        dataset = load_dataset(config.data)
        print(f"data: {len(dataset.train_labels)} train / {len(dataset.test_labels)} test images "
              f"from {dataset.source}; output: {phase_dir}")
        trainer = Trainer(config, dataset, phase_dir, progress=progress)
    trainer.run()


def extension_note(trainer, planned):
    """What `--resume --epochs` does to the schedule of a run planned for `planned` epochs."""
    from nptwofold.train import learning_rate

    config, step = trainer.config, trainer.state["global_step"]
    if config.epochs == planned:
        return f"--epochs {planned} is the run's own number: nothing changes"
    if config.schedule == "step":
        return (f"training to {config.epochs} epochs instead of {planned}: the step schedule "
                f"does not depend on --epochs, so this is exactly the {config.epochs}-epoch run")
    planned_lr = learning_rate(dataclasses.replace(config, epochs=planned), step,
                               trainer.steps_per_epoch)
    new_lr = learning_rate(config, step, trainer.steps_per_epoch)
    return (f"training to {config.epochs} epochs instead of {planned}: the cosine schedule is "
            f"recomputed for {config.epochs} epochs from here (next learning rate {new_lr:.4g} "
            f"instead of {planned_lr:.4g}), so the result differs from a run planned for "
            f"{config.epochs} epochs from the start")



def config_differences(saved, wanted):
    """{field: (saved value, wanted value)} where `wanted` (a TrainConfig dict, or some of its
    fields) differs from the `saved` one: Twofold and hardware fields by their own name, --init
    and --teacher by the file they name, --data by the dataset it holds."""
    from nptwofold.config import dataset_name

    differences = {}
    for name, value in wanted.items():
        old = saved.get(name)
        if name == "hardware":  # the array's fields, by their own name
            differences.update({key: (old.get(key), item) for key, item in value.items()
                                if old.get(key) != item})
        elif name == "data":  # a checkpoint names its dataset; --data may say where it lies
            if dataset_name(old) != dataset_name(value):
                differences[name] = (old, value)
        elif name == "twofold" and old is not None and value is not None:
            differences.update({key: (old.get(key), item) for key, item in value.items()
                                if old.get(key) != item})
        elif name == "twofold" and (old is None) != (value is None):
            differences.update({key: ("none (a float run)", item) for key, item in
                                (value or {}).items()} or {name: ("on", "off")})
        elif name in ("init", "teacher") and None not in (old, value):
            if Path(old).resolve() != Path(value).resolve():
                differences[name] = (old, value)
        elif old != value:
            differences[name] = (old, value)
    return differences


def check_resume_flags(args, phases):
    """Refuses, before any work, a --resume whose flags differ from the saved run's config:
    one run resumes with the saved config, so each flag given must equal it; the twofold
    preset's phases follow from its flags, so they must give every phase's saved config."""
    from nptwofold.checkpoint import load_checkpoint
    from nptwofold.config import TrainConfig
    from nptwofold.errors import NptwofoldError
    from nptwofold.hardware import given_hardware
    from nptwofold.twofold import TwofoldConfig

    def shown(differences, phase=None):
        return ", ".join(f"{flag_name(PHASE_FLAGS.get((phase, name), name))} {old} (given: "
                         f"{new})" for name, (old, new) in differences.items())

    def saved_config(path):
        return dataclasses.asdict(TrainConfig.from_dict(load_checkpoint(path)["config"]))

    if len(phases) == 1:
        path = phases[0][0] / "last.h5" if args.resume == "last" else Path(args.resume)
        wanted = given_values(args, TrainConfig)
        wanted.pop("epochs", None)  # --epochs trains the run to that many (Trainer.resume)
        if given_values(args, TwofoldConfig):
            wanted["twofold"] = given_values(args, TwofoldConfig)
        if given_hardware(args):
            wanted["hardware"] = given_hardware(args)
        if args.preset_given:
            wanted["preset"] = args.preset
        differences = config_differences(saved_config(path), wanted)
        if differences:
            raise NptwofoldError(f"--resume continues the saved run {path}, which has "
                                 f"{shown(differences)}; drop "
                                 + ", ".join(flag_name(name) for name in differences)
                                 + " (or start a new run with another --out)")
        return
    for phase_dir, config in phases:
        if (phase_dir / "last.h5").exists():
            phase = phase_dir.name
            differences = config_differences(saved_config(phase_dir / "last.h5"),
                                             dataclasses.asdict(config))
            if differences:
                raise NptwofoldError(f"{phase_dir} was run with {shown(differences, phase)}; "
                                     "give the saved pipeline's flags to resume it, or drop "
                                     "--resume and choose another --out")


def output_folder(args):
    """--out, absolute (so that messages say where the outputs are whatever the working
    folder); by default the folder of the checkpoint a single run resumes, else
    runs/<preset>-seed<seed>."""
    if args.out:
        return Path(args.out).absolute()
    if args.resume not in (None, "last") and args.preset != "twofold":
        return Path(args.resume).absolute().parent
    return Path(f"runs/{args.preset}-seed{args.seed or 0}").absolute()


def main(argv=None):
    configure_threads(threads_flag(argv))
    args = parse_args(argv)
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import RunLock, check_output_dir, remove_empty_folders

    created = []  # output folders this run made: removed again if it fails before using them
    try:
        out_dir = output_folder(args)
        phases = phase_configs(args, out_dir)
        pipeline = len(phases) > 1
        if args.resume and pipeline and not any(
                (phase_dir / "last.h5").exists() for phase_dir, _ in phases):
            raise NptwofoldError(f"nothing to resume in {out_dir}: no phase has a last.h5 "
                                 "(drop --resume to start the pipeline)")
        if args.resume:
            check_resume_flags(args, phases)
        for phase_dir, _ in phases:
            created += check_output_dir(phase_dir)
        # before any work; each phase's trainer also locks its folder, so that a second
        # pipeline can neither start between two phases nor write into a running phase
        with RunLock(out_dir):
            for phase_dir, config in phases:
                resume_from = None
                if args.resume and pipeline:  # continue a started phase, start the others
                    if (phase_dir / "last.h5").exists():
                        resume_from = phase_dir / "last.h5"
                elif args.resume:
                    resume_from = (phase_dir / "last.h5" if args.resume == "last"
                                   else Path(args.resume))
                run_phase(config, phase_dir, resume_from, progress=not args.no_progress,
                          epochs=args.epochs if args.resume else None, single_run=not pipeline,
                          data=args.data)
        final = json.loads((phases[-1][0] / "summary.json").read_text())
    except NptwofoldError as exc:
        remove_empty_folders(created)
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        remove_empty_folders(created)
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
    from nptwofold.errors import run_script
    run_script(main)
