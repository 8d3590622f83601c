"""Twofold runs over network sparsity x bit-level regularization, and one table of their results.

    python scripts/sweep.py --init BASELINE.h5 --data PATH --out results/sweep
        [--sparsity 0 0.5 0.7 0.9] [--beta-bit 20] [--finetune-beta-bit B]
        [--plane-drop-tolerance NATS]
        [--twofold-epochs 1] [--finetune-epochs 1] [any other Twofold flag of train_cifar.py]
        [--jobs 2] [--collect-only] [--energy-images N] [--baseline CKPT] [--seed S]

Runs: for every sparsity p, one run with Reg_Bit off (beta 0) and one with it on (--beta-bit
in the twofold phase, --finetune-beta-bit, by default the same, in the fine-tune, and
--plane-drop-tolerance for the precision adjustment in post-training, after hard pruning),
each `scripts/train_cifar.py --preset twofold --init BASELINE` (twofold phase, then
post-training) in OUT/p<100p>-bitreg-<on|off>, with --resume once a phase of it exists, so a
stopped sweep continues where it stopped and finished runs are skipped. The other Twofold flags
(--weight-bits, --mask-group, ...) go to every run. `--jobs` runs go side by side,
each on one engine thread (on 2 cores, two 1-thread runs train more images per second than one
2-thread run). Each run's output goes to its train.log.

Collection, for every finished run:
- test accuracy before post-training, after hard pruning and after the fine-tune (summaries);
- share of zero bits and of 00 cells over the kept weights (the post-training report);
- energy per image on the array, counted over the first --energy-images test images (the
  counting path, `CimNetwork.fake_quant_logits(count_energy=True)`; its accuracy is the
  ideal-ADC CIM accuracy), with the ratio to the baseline: by default the p = 0 run without
  Reg_Bit, the dense 8-bit model trained without Reg_Bit (the poster's baseline), or --baseline CKPT.
Writes OUT/sweep.md, sweep.csv and sweep.json, and with matplotlib the plots
energy_vs_sparsity.png, accuracy_vs_sparsity.png and layer_energy.png.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)
from nptwofold.options import (ScriptParser, add_flags, flag_name, given_values,  # noqa: E402
                               threads_flag, to_argv)

# The poster's energy claims for ResNet-20 on CIFAR-10, drawn beside our ratios.
POSTER_MAX_RATIO = 5.0                               # "up to 5x lower energy"
TALK_RATIOS = {0.1: 2.2, 0.9: 14.0}                  # overall sparsity -> ratio, talk version


# options that shape the bit-level regularization: only the runs with Reg_Bit on get them
BIT_REG_ONLY = ("plane_drop_tolerance", "finetune_beta_bit")


def parse_args(argv):
    from nptwofold.config import PipelineConfig
    from nptwofold.errors import NptwofoldError
    from nptwofold.hardware import HardwareConfig
    from nptwofold.twofold import TwofoldConfig

    parser = ScriptParser(__doc__)
    parser.add_argument("--out", required=True, help="folder of the runs and the table")
    parser.add_argument("--init", help="trained baseline checkpoint the runs start from "
                        "(required to train; not used with --collect-only)")
    parser.add_argument("--data", help="CIFAR-10 tarball or folder, 'sample' or 'cifar10' "
                        "(required to train; not used with --collect-only)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9],
                        help="network sparsities, one pair of runs each (default: 0 0.5 0.7 0.9)")
    parser.add_argument("--beta-bit", type=float, default=20.0,
                        help="Reg_Bit strength of the 'on' runs (default: 20)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2)")
    parser.add_argument("--collect-only", action="store_true", help="no training, only the table")
    parser.add_argument("--energy-images", type=int, default=10000,
                        help="test images the energy is counted on (default: 10000, all)")
    parser.add_argument("--calib-images", type=int, default=500,
                        help="images the activation clips are calibrated on (default: 500)")
    parser.add_argument("--baseline", metavar="CKPT",
                        help="dense 8-bit baseline (default: the p = 0 run without Reg_Bit)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the engine's pool in the collection (default: 2)")
    passed = parser.add_argument_group(
        "train_cifar.py flags passed to the runs (" + ", ".join(map(flag_name, BIT_REG_ONLY))
        + " only to the runs with Reg_Bit on)")
    add_flags(passed, TwofoldConfig, skip=("sparsity", "beta_bit"))
    add_flags(passed, HardwareConfig)
    add_flags(passed, PipelineConfig)
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    args = parser.parse_args(argv)
    if not args.collect_only and not (args.init and args.data):
        parser.error("training the runs needs --init and --data (or pass --collect-only)")
    for name in ("jobs", "energy_images", "calib_images", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"{flag_name(name)} must be >= 1 (got {getattr(args, name)})")
    if not args.beta_bit > 0:
        parser.error(f"--beta-bit must be > 0 (got {args.beta_bit}): it is the strength of "
                     "the 'on' runs")
    if any(not 0 <= p < 1 for p in args.sparsity):
        parser.error(f"--sparsity must be in [0, 1) (got {args.sparsity})")
    args.passed = {**given_values(args, TwofoldConfig, skip=("sparsity", "beta_bit")),
                   **given_values(args, HardwareConfig), **given_values(args, PipelineConfig)}
    try:
        TwofoldConfig(**given_values(args, TwofoldConfig, skip=("sparsity",))).validated()
        HardwareConfig(**given_values(args, HardwareConfig))
        args.pipeline = PipelineConfig(**given_values(args, PipelineConfig)).validated()
    except NptwofoldError as exc:
        parser.error(str(exc))
    return args


def run_label(sparsity, bit_reg):
    return f"p{round(100 * sparsity):02d}-bitreg-{'on' if bit_reg else 'off'}"


def planned_runs(args):
    """[(label, sparsity, beta)] in the order they are trained: the baseline run first."""
    return [(run_label(p, beta > 0), p, beta)
            for p in sorted(args.sparsity) for beta in (0.0, args.beta_bit)]


def train_command(args, sparsity, beta, out):
    """The run's train_cifar.py command; --resume where an earlier call left a phase."""
    passed = {name: value for name, value in args.passed.items()
              if beta or name not in BIT_REG_ONLY}
    resume = ["--resume"] if any(out.glob("*/last.h5")) else []
    return [sys.executable, str(REPO / "scripts/train_cifar.py"), "--preset", "twofold",
            "--init", args.init, "--data", args.data, "--seed", str(args.seed),
            "--sparsity", str(sparsity), "--beta-bit", str(beta), *to_argv(passed),
            "--threads", "1", "--no-progress", *resume, "--out", str(out)]


def train_all(args, out_dir):
    """Runs every planned run, `args.jobs` at a time; returns the labels that failed."""
    waiting = [(label, train_command(args, p, beta, out_dir / label))
               for label, p, beta in planned_runs(args)]
    running, failed = {}, []
    while waiting or running:
        while waiting and len(running) < args.jobs:
            label, command = waiting.pop(0)
            (out_dir / label).mkdir(parents=True, exist_ok=True)
            log = open(out_dir / label / "train.log", "a")
            print(f"start {label}: {' '.join(command[1:])}", flush=True)
            running[label] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(5)
        for label, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[label]
                status = "done" if process.returncode == 0 else f"failed ({process.returncode})"
                print(f"{status} {label}: see {out_dir / label / 'train.log'}", flush=True)
                if process.returncode:
                    failed.append(label)
    return failed


def energy_of(checkpoint, dataset, args, baseline=None):
    """(ideal-ADC accuracy, energy_report) of a checkpoint on the first test images, counted."""
    from nptwofold.cim.calibration import CalibrationCache, default_path
    from nptwofold.cim.network import CimNetwork

    network, content = CimNetwork.from_checkpoint(checkpoint)
    cache = CalibrationCache(default_path(checkpoint), dataset.train_images[:args.calib_images])
    cache.prepare(network)
    cache.save(network)
    predictions = network.count_energy(dataset.test_images[:args.energy_images],
                                       progress=f"energy {Path(checkpoint).parent.parent.name}")
    accuracy = float((predictions == dataset.test_labels[:args.energy_images]).mean())
    return accuracy, network.energy_report(baseline)


def collect(args, out_dir):
    """(rows, per-layer energies, baseline path, images counted) of the finished runs."""
    from nptwofold.data import load_dataset
    from nptwofold.errors import NptwofoldError

    runs = []
    for label, sparsity, beta in planned_runs(args):
        post = out_dir / label / "post"
        summary = post / "summary.json"
        finished = summary.exists() and (
            json.loads(summary.read_text())["epochs_done"] >= args.pipeline.finetune_epochs)
        if not finished:
            print(f"{label}: not finished, left out of the table")
            continue
        runs.append((label, sparsity, beta, post))
    if not runs:
        raise NptwofoldError(f"no finished runs in {out_dir}")
    baseline_path = Path(args.baseline) if args.baseline else (
        out_dir / run_label(0.0, False) / "post" / "last.h5")
    if not baseline_path.exists():
        raise NptwofoldError(f"baseline {baseline_path} not found: train the p = 0 run without "
                             "Reg_Bit or pass --baseline")
    dataset = load_dataset(args.data or json.loads(
        (runs[0][3] / "summary.json").read_text())["config"]["data"])
    _, baseline = energy_of(baseline_path, dataset, args)
    rows, layer_energy = [], {}
    for label, sparsity, beta, post in runs:
        summary = json.loads((post / "summary.json").read_text())
        report = json.loads((post / "twofold_report.json").read_text())[-1]["layers"][-1]
        cim_accuracy, energy = energy_of(post / "last.h5", dataset, args, baseline)
        total = energy["total"]
        rows.append(dict(
            run=label, sparsity=sparsity, beta_bit=beta,
            finetune_beta_bit=summary["config"]["twofold"]["beta_bit"],
            acc_before_post=summary["post_training"]["accuracy_before"],
            acc_after_prune=summary["post_training"]["accuracy_after_prune"],
            acc_after_post=summary["final_test_acc"], acc_cim_ideal=cim_accuracy,
            network_sparsity=report["network_sparsity"], zero_bit_share=report["zero_bit_share"],
            cells_00_share=report["cells_00"], energy_nj=total["total_pj"] / 1e3,
            cells_nj=total["cells_pj"] / 1e3, adc_nj=total["adc_pj"] / 1e3,
            lfsr_nj=total["lfsr_pj"] / 1e3, baseline_nj=total["baseline_total_pj"] / 1e3,
            energy_ratio=total["baseline_ratio"]))
        layer_energy[label] = {row["layer"]: row["total_pj"] / 1e3 for row in energy["layers"]}
    layer_energy["baseline"] = {row["layer"]: row["total_pj"] / 1e3 for row in baseline["layers"]}
    return rows, layer_energy, str(baseline_path), baseline["n_images"]


def markdown_table(rows, baseline_path, energy_images):
    lines = [f"Energy counted on {energy_images} test images; ratio = baseline / run, baseline "
             f"`{baseline_path}`.", "",
             "| run | sparsity | beta (twofold/fine-tune) | acc before post | after prune | "
             "after post | zero bits | 00 cells | energy/img nJ (cells/ADC/LFSR) | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['network_sparsity']:.3f} | "
            f"{r['beta_bit']:g}/{r['finetune_beta_bit']:g} | "
            f"{100 * r['acc_before_post']:.2f} % | {100 * r['acc_after_prune']:.2f} % | "
            f"{100 * r['acc_after_post']:.2f} % | {r['zero_bit_share']:.3f} | "
            f"{r['cells_00_share']:.3f} | {r['energy_nj']:.0f} ({r['cells_nj']:.0f}/"
            f"{r['adc_nj']:.0f}/{r['lfsr_nj']:.1f}) | {r['energy_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def draw_plots(rows, layer_energy, out_dir):
    """The three plots, or a message if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return []
    by_reg = {on: sorted((r for r in rows if (r["beta_bit"] > 0) == on),
                         key=lambda r: r["sparsity"]) for on in (False, True)}
    names = {False: "Reg_Bit off", True: "Reg_Bit on"}

    figure, (energy_axis, ratio_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for on, runs in by_reg.items():
        sparsity = [100 * r["network_sparsity"] for r in runs]
        energy_axis.plot(sparsity, [r["energy_nj"] for r in runs], "o-", label=names[on])
        ratio_axis.plot(sparsity, [r["energy_ratio"] for r in runs], "o-", label=names[on])
    ratio_axis.plot([100 * p for p in TALK_RATIOS], list(TALK_RATIOS.values()), "k^",
                    label="talk version (2.2x at 10 %, 14x at 90 %)")
    ratio_axis.axhline(POSTER_MAX_RATIO, color="gray", linestyle="--", label="poster: up to 5x")
    energy_axis.set(xlabel="network sparsity (%)", ylabel="energy per image (nJ)",
                    title="CIM energy per image")
    ratio_axis.set(xlabel="network sparsity (%)", ylabel="baseline / run",
                   title="energy ratio to the dense 8-bit baseline")
    for axis in (energy_axis, ratio_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "energy_vs_sparsity.png", dpi=120)

    figure, axis = plt.subplots(figsize=(6, 4))
    for on, runs in by_reg.items():
        sparsity = [100 * r["network_sparsity"] for r in runs]
        axis.plot(sparsity, [100 * r["acc_after_post"] for r in runs], "o-",
                  label=f"{names[on]}, after post-training")
        axis.plot(sparsity, [100 * r["acc_before_post"] for r in runs], "x--",
                  label=f"{names[on]}, before post-training")
    axis.set(xlabel="network sparsity (%)", ylabel="test accuracy (%)",
             title="ResNet-20 / CIFAR-10 accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy_vs_sparsity.png", dpi=120)

    figure, axis = plt.subplots(figsize=(10, 4))
    layers = list(layer_energy["baseline"])
    for label, energies in layer_energy.items():
        axis.plot(range(len(layers)), [energies[name] for name in layers], "o-", markersize=3,
                  label=label, linewidth=2.5 if label == "baseline" else 1)
    axis.set_xticks(range(len(layers)), layers, rotation=70, fontsize=7)
    axis.set(ylabel="energy per image (nJ)", title="per-layer CIM energy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(out_dir / "layer_energy.png", dpi=120)
    plt.close("all")
    return ["energy_vs_sparsity.png", "accuracy_vs_sparsity.png", "layer_energy.png"]


def main(argv=None):
    configure_threads(threads_flag(argv))
    args = parse_args(argv)
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import atomic_write, write_csv, write_json

    out_dir = Path(args.out).absolute()
    try:
        if not args.collect_only:
            failed = train_all(args, out_dir)
            if failed:
                print(f"runs failed: {', '.join(failed)}; they are left out of the table")
        rows, layer_energy, baseline_path, n_images = collect(args, out_dir)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    table = markdown_table(rows, baseline_path, n_images)
    atomic_write(out_dir / "sweep.md", lambda tmp: Path(tmp).write_text(table))
    write_csv(out_dir / "sweep.csv", rows)
    write_json(out_dir / "sweep.json",
               dict(baseline=baseline_path, rows=rows, layer_energy_nj=layer_energy))
    print(table)
    plots = draw_plots(rows, layer_energy, out_dir)
    print(f"table: {out_dir / 'sweep.md'} (.csv, .json)"
          + (f"; plots: {', '.join(plots)}" if plots else ""))


if __name__ == "__main__":
    main()
