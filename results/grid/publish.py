"""How this folder is made from the sweep's folder, and back (run from the repository root):

    python results/grid/publish.py export RUN [RUN ...]   # runs/results/RUN -> results/grid/RUN
    python results/grid/publish.py restore                # results/grid -> runs/results
    python results/grid/publish.py rows                   # the main README's results rows

`export` writes each trained run's compact model (scripts/export_model.py), its logs, phase
summaries and chip report, and copies the sweep's tables and plots. `restore` rebuilds a sweep
folder from the published runs in a fresh clone: each gets its phase summaries, its twofold
report (recomputed from the published model), its chip report and the records by which the
sweep knows it trained and collected it, so `scripts/sweep.py sweeps/results.toml --out
runs/results` trains only the runs not published yet. `rows` prints the README table's rows
from chips.csv and the reference chip's report.
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from nptwofold import sweep as sweeps  # noqa: E402
from nptwofold.build import load_model  # noqa: E402
from nptwofold.errors import NptwofoldError  # noqa: E402
from nptwofold.files import write_json  # noqa: E402

GRID = REPO / "results/grid"
OUT = REPO / "runs/results"
SWEEP_FILE = REPO / "sweeps/results.toml"
RUN_FILES = ("train.log", sweeps.CIM_LOG, sweeps.CIM_REPORT)
PHASE_FILES = ("log.csv", "summary.json")
PHASES = ("twofold", "post")
TABLES = [f"{name}.{kind}" for name in (sweeps.TABLE, sweeps.CHIPS)
          for kind in ("md", "csv", "json")]
ENCODING_NAMES = dict(twos_complement="two's complement", sign_magnitude="sign-magnitude")


def copy(names, source, target):
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source / name, target / name)


def copy_run(source, target):
    """A run's logs, phase summaries and chip report, from one run folder to another."""
    copy(RUN_FILES, source, target)
    for phase in PHASES:
        copy(PHASE_FILES, source / phase, target / phase)


def export(runs):
    for name in runs:
        source, target = OUT / name, GRID / name
        if not (source / sweeps.CIM_REPORT).exists():
            sys.exit(f"error: {source} is not trained and collected yet")
        subprocess.run([sys.executable, str(REPO / "scripts/export_model.py"),
                        str(source / "post/last.h5"), str(target / "model.h5")], check=True)
        copy_run(source, target)
    copy([*TABLES, *(p.name for p in OUT.glob("*.png"))], OUT, GRID)
    copy((sweeps.CIM_LOG, sweeps.CIM_REPORT), OUT / sweeps.REFERENCE, GRID / sweeps.REFERENCE)


def restore():
    sweep = sweeps.load_sweep_file(SWEEP_FILE)
    OUT.mkdir(parents=True, exist_ok=True)
    sweeps.open_sweep_folder(OUT, sweep)
    cim_argv = sweeps.to_argv(sweep.cim_eval)
    for name, (_, argv) in sweep.runs().items():
        source, target = GRID / name, OUT / name
        if not (source / "model.h5").exists():
            continue
        copy_run(source, target)
        shutil.copy(source / "model.h5", target / "post/last.h5")
        _, method, _ = load_model(source / "model.h5")
        epochs = json.loads((source / "post/summary.json").read_text())["epochs_done"]
        write_json(target / "post/twofold_report.json",
                   [dict(epoch=epochs, layers=method.layer_report())])
        trained = dict(argv=argv, finished="restored from results/grid", host="", last_seconds=0)
        write_json(target / sweeps.DONE, trained)
        write_json(target / sweeps.CIM_KEY, sweeps.run_key(cim_argv, trained))
        print(f"restored {name}")
    copy((sweeps.CIM_LOG, sweeps.CIM_REPORT), GRID / sweeps.REFERENCE, OUT / sweeps.REFERENCE)
    write_json(OUT / sweeps.REFERENCE / sweeps.CIM_KEY, sweeps.reference_key(sweep, REPO)[2])


def readme_row(p, method, encoding, adc_bits, accuracy, lost, reads_00, energy_nj, ratio):
    return (f"| {p} | {method} | {ENCODING_NAMES[encoding]}, {adc_bits}-bit ADC | "
            f"{100 * accuracy:.2f} % | {lost:.2f} | {100 * reads_00:.1f} % | "
            f"{energy_nj / 1e3:.1f} uJ | {ratio:.1f}x |")


def rows():
    reference = json.loads((GRID / sweeps.REFERENCE / sweeps.CIM_REPORT).read_text())
    [chip] = reference["runs"]
    dense = reference["accuracy"]["float"]
    print(readme_row(0, "reference chip", chip["encoding"], chip["adc_bits"], chip["accuracy"],
                     100 * (dense - chip["accuracy"]), chip["total"]["cells_00"],
                     chip["total"]["total_pj"] / 1e3, 1.0))
    with open(GRID / f"{sweeps.CHIPS}.csv", newline="") as f:
        for row in sorted(csv.DictReader(f), key=lambda row: float(row["sparsity"])):
            print(readme_row(row["sparsity"], row["method"], row["encoding"], row["adc_bits"],
                             *(float(row[key]) for key in ("cim_acc", "acc_lost_pt",
                                                           "cell_reads_00", "energy_nj",
                                                           "reference_ratio"))))


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        if action == "export" and len(sys.argv) > 2:
            export(sys.argv[2:])
        elif action in ("restore", "rows") and len(sys.argv) == 2:
            {"restore": restore, "rows": rows}[action]()
        else:
            sys.exit(__doc__)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
