"""Training curves of one or more runs: test and train accuracy and the learning rate against
the epoch, read from each run's log.csv (needs matplotlib: pip install -e '.[plot]').

    python scripts/plot_curves.py RUN [RUN ...] --out curves.png

RUN is a run folder (train_cifar.py's --out, or one phase of a twofold run) or its log.csv.
Prints each run's last and best test accuracy.
"""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser  # noqa: E402

COLUMNS = ("epoch", "train_acc", "test_acc", "lr")


def read_log(path):
    """The columns of a train_cifar.py log.csv as lists of floats, in epoch order."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.csv"
    if not path.is_file():
        raise ValueError(f"{path} not found (give a run folder or its log.csv)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} holds no epochs")
    missing = [name for name in COLUMNS if name not in rows[0]]
    if missing:
        raise ValueError(f"{path} is not a training log: no column {', '.join(missing)}")
    try:
        log = {name: [float(row[name]) for row in rows] for name in COLUMNS}
    except (TypeError, ValueError):
        raise ValueError(f"{path} has a row that is not numbers (truncated?)") from None
    return path, log


def main(argv=None):
    parser = ScriptParser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or log.csv files")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        logs = [read_log(run) for run in args.runs]
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib (pip install -e '.[plot]')")
    from nptwofold.files import atomic_write, check_output_file
    from nptwofold.errors import NptwofoldError
    try:
        check_output_file(args.out)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")

    figure, (accuracy_axis, lr_axis) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    for path, log in logs:
        label = path.parent.name
        line, = accuracy_axis.plot(log["epoch"], log["test_acc"], label=f"{label} test")
        accuracy_axis.plot(log["epoch"], log["train_acc"], "--", color=line.get_color(),
                           alpha=0.6, label=f"{label} train")
        lr_axis.plot(log["epoch"], log["lr"], color=line.get_color())
        best = max(range(len(log["epoch"])), key=log["test_acc"].__getitem__)
        print(f"{path}: {len(log['epoch'])} epochs, last test accuracy "
              f"{log['test_acc'][-1]:.4f}, best {log['test_acc'][best]:.4f} (epoch "
              f"{log['epoch'][best]:g})")
    accuracy_axis.set(ylabel="accuracy")
    accuracy_axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=7)
    lr_axis.set(xlabel="epoch", ylabel="learning rate")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(args.out, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
