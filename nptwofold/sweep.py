"""Sweeps: a grid of `scripts/train_cifar.py` runs executed as Dask tasks, and the table of
their results (docs/sweeps.md).

A sweep is axes (a flag and its values; the grid is their product) and shared flags. Each run
is one task that runs train_cifar.py in its own folder, named from its axis values, with
`--resume` once the folder holds a checkpoint: a task whose worker is lost is started again by
Dask on another worker and continues from the run's last epoch, so its final weights are the
ones an uninterrupted run writes. The same task then collects the run (`cim_eval.py` on its
final checkpoint, one row per array variant), and the client rewrites the tables and plots
after every collected run, so a sweep that spans days shows its finished runs while the
others train.

The folder of a sweep holds its manifest (sweep.json: the grid), a lock held for the sweep's
life, the run folders and the tables. The Dask cluster is the caller's: `local_cluster`,
`jobqueue_cluster` or a scheduler address (`connect`).
"""
import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import NptwofoldError
from .files import atomic_write, check_output_dir, write_csv, write_json
from .options import flag_name, to_argv

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
MANIFEST = "sweep.json"
LOCK = "sweep.lock"
DONE = "done.json"          # written in a run's folder once its trainer exited with 0
TRAIN_LOG = "train.log"
CIM_LOG = "cim_eval.log"
CIM_REPORT = "cim_eval.json"
CIM_KEY = "cim_eval.key.json"  # what CIM_REPORT was computed from: its flags and the run's DONE
TABLE = "results"           # results.md, results.csv, results.json
CHIPS = "chips"             # chips.md, .csv, .json: each run's row on the chip it would be built as
# chips.md is the headline table, these columns after the axes (.csv and .json keep them all):
# accuracy in training and on the chip, points lost against the reference model, share of
# cell reads in state 00, energy per image and its ratio to the reference chip's
CHIP_COLUMNS = ("encoding", "adc", "test_acc", "cim_acc", "acc_lost_pt", "cell_reads_00",
                "cells_nj", "adc_nj", "lfsr_nj", "energy_nj", "reference_ratio")
REFERENCE = "reference"     # OUT/reference/: the reference chip's cim_eval report
# cim_eval flags the reference chip shares with the runs, so that both count the same images
SAME_IMAGES = ("data", "images", "calib_images")
FORMAT = "nptwofold-sweep"
INSTALL_HINT = "the sweep runs on Dask: pip install -e '.[cluster]' (dask, distributed, " \
               "dask-jobqueue)"
# flags the runner gives train_cifar.py and cim_eval.py itself
RESERVED = {"out": "the run's folder is set by the sweep",
            "resume": "the sweep resumes runs itself",
            "threads": "use --run-threads", "no_progress": "runs never draw progress bars"}
CIM_RESERVED = {"json": "the sweep keeps the report in the run's folder",
                "threads": "use --run-threads", "no_progress": "runs never draw progress bars"}
CLUSTERS = ("slurm", "pbs", "sge", "lsf")
ENDED = ("finished", "error", "cancelled")  # a Future's status once Dask gave up or succeeded
FOLDER_CHARACTERS = re.compile(r"[^A-Za-z0-9.+-]+")

# Runs a script with a thread that ends it once its parent (the Dask worker) is gone, so a
# killed worker never leaves a trainer running; unlike prctl(PR_SET_PDEATHSIG) it is portable
# and needs no preexec_fn, which is unsafe in a multi-threaded worker. argv: PID SCRIPT ARGS.
ORPHAN_GUARD = """\
import os, runpy, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(137)
threading.Thread(target=watch, daemon=True).start()
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Preloaded by the local cluster's worker processes, which share the terminal's process group:
# the sweep closes them itself on Ctrl-C, so they ignore it, with a Python handler rather than
# SIG_IGN, which the trainers would inherit (they must get Ctrl-C to save their position)
WORKER_CTRL_C = "import signal\nsignal.signal(signal.SIGINT, lambda signum, frame: None)\n"


def parse_value(text):
    """A value given on the command line: an int, a finite float, true/false, a JSON object
    (a variant: {"name": ..., flags}), else the text."""
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise NptwofoldError(f"{text!r} is not a JSON object: {exc}") from None
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            value = kind(text)
            if math.isfinite(value):
                return value
    return {"true": True, "false": False}.get(text, text)


def _flag_key(name, where, reserved=RESERVED):
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise NptwofoldError(f"{where}: {name!r} is not a flag name (e.g. sparsity, lambda-net)")
    key = name.replace("-", "_")
    if key in reserved:
        raise NptwofoldError(f"{where}: {flag_name(key)} cannot be set ({reserved[key]})")
    return key


def _checked_value(value, where):
    scalars = (bool, int, float, str)
    if isinstance(value, list) and all(isinstance(item, scalars) for item in value):
        return value
    if not isinstance(value, scalars) or (isinstance(value, float) and not math.isfinite(value)):
        raise NptwofoldError(f"{where} must be a number, a string, true/false or a list of "
                             f"them (got {value!r})")
    return value


def _checked_flags(flags, where, reserved=RESERVED):
    if not isinstance(flags, dict):
        raise NptwofoldError(f"{where} must be a table of flag = value (got {flags!r})")
    return {_flag_key(name, where, reserved): _checked_value(value, f"{where}: {name}")
            for name, value in flags.items()}


def _checked_variant(variant, where):
    """A variant: a table with a `name` (its folder text) and the flags it sets."""
    if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
        raise NptwofoldError(f"{where}: a variant must be a table with a name and its flags, "
                             f"e.g. {{name = \"on\", beta-bit = 20}} (got {variant!r})")
    flags = {key: value for key, value in variant.items() if key != "name"}
    return dict(name=variant["name"], **_checked_flags(flags, where))


def _value_text(value):
    if isinstance(value, dict):
        value = value["name"]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "+".join(map(_value_text, value))
    return FOLDER_CHARACTERS.sub("~", str(value)).strip(".") or "~"


def _checked_chip(chip, cim_eval):
    """The chip table: `adc_tolerance` (points; each run's chip takes the narrowest ADC width
    cim_eval evaluated whose accuracy is within it of the ideal ADC's), `reference` (a
    checkpoint: the chip every energy is compared with) and `reference_flags` (its cim_eval
    flags, one encoding and one ADC width)."""
    if not isinstance(chip, dict):
        raise NptwofoldError(f"chip must be a table (got {chip!r})")
    chip = {_flag_key(name, "chip", {}): value for name, value in chip.items()}
    unknown = set(chip) - {"adc_tolerance", "reference", "reference_flags"}
    if unknown:
        raise NptwofoldError("chip: unknown key(s) " + ", ".join(sorted(unknown))
                             + " (known: adc-tolerance, reference, reference-flags)")
    if "adc_tolerance" in chip:
        tolerance = chip["adc_tolerance"]
        if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                or not math.isfinite(tolerance) or tolerance < 0):
            raise NptwofoldError(f"chip: adc-tolerance must be a number of points >= 0 (got "
                                 f"{tolerance!r})")
        widths = cim_eval.get("adc_bits")
        if not (isinstance(widths, list) and 0 in widths and len(widths) > 1):
            raise NptwofoldError("chip: adc-tolerance needs cim_eval adc-bits listing the "
                                 "ideal ADC (0) and the widths to choose from, e.g. "
                                 "[0, 4, 5, 6, 7, 8]")
    if "reference" in chip and not isinstance(chip["reference"], str):
        raise NptwofoldError(f"chip: reference must be a checkpoint path (got "
                             f"{chip['reference']!r})")
    if "reference_flags" in chip:
        if "reference" not in chip:
            raise NptwofoldError("chip: reference-flags need a reference checkpoint")
        chip["reference_flags"] = _checked_flags(chip["reference_flags"],
                                                 "chip: reference-flags", CIM_RESERVED)
    return chip


@dataclasses.dataclass
class Sweep:
    """The grid: `axes` {flag: [values]} (product, first axis outermost), `flags` given to every
    run, `cim_eval` flags of the collection, `chip` how each run's chip is chosen and the
    reference chip (`_checked_chip`). Flag names use underscores. An axis of variants
    has any name and tables as values, each a `name` and the flags it sets (Reg_Bit off: beta
    0; on: beta 20 with a precision budget), for runs that differ in several flags at once."""
    axes: dict
    flags: dict = dataclasses.field(default_factory=dict)
    cim_eval: dict = dataclasses.field(default_factory=dict)
    chip: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.axes, dict) or not self.axes:
            raise NptwofoldError("a sweep needs at least one axis (e.g. sparsity = [0, 0.5])")
        axes = {}
        for name, values in self.axes.items():
            key = _flag_key(name, "axes")
            if not isinstance(values, list) or not values:
                raise NptwofoldError(f"axis {name} must be a non-empty list of values "
                                     f"(got {values!r})")
            if any(isinstance(value, dict) for value in values):
                values = [_checked_variant(value, f"axis {name}") for value in values]
                names = [value["name"] for value in values]
                if len(set(names)) < len(names):
                    raise NptwofoldError(f"axis {name}: two variants are named "
                                         f"{next(n for n in names if names.count(n) > 1)!r}")
            for index, value in enumerate(values):
                if not isinstance(value, dict):
                    _checked_value(value, f"axis {name}")
                if value in values[:index]:  # 0.5 and 0.50, or 0 and 0.0, are one run
                    raise NptwofoldError(f"axis {name} lists {value!r} twice")
            axes[key] = values
        self.axes = axes
        self.flags = _checked_flags(self.flags, "flags")
        set_by = [set(self.flags)] + [{name for variant in values for name in variant} - {"name"}
                                      if isinstance(values[0], dict) else {key}
                                      for key, values in self.axes.items()]
        both = {name for one, other in itertools.combinations(set_by, 2) for name in one & other}
        if both:
            raise NptwofoldError("set by two axes, or an axis and a shared flag: "
                                 + ", ".join(map(flag_name, sorted(both))))
        self.cim_eval = _checked_flags(self.cim_eval, "cim_eval", CIM_RESERVED)
        self.chip = _checked_chip(self.chip, self.cim_eval)

    def runs(self):
        """{folder name: (axis values {axis: value or variant name}, train_cifar flags)}, in
        grid order; two runs that would share a folder are refused."""
        runs = {}
        for values in itertools.product(*self.axes.values()):
            point, flags = {}, dict(self.flags)
            for key, value in zip(self.axes, values):
                if isinstance(value, dict):
                    point[key] = value["name"]
                    flags.update((flag, setting) for flag, setting in value.items()
                                 if flag != "name")
                else:
                    point[key] = flags[key] = value
            name = "_".join(f"{flag_name(key)[2:]}-{_value_text(value)}"
                            for key, value in point.items())
            if name in runs:
                raise NptwofoldError(f"runs {runs[name][0]} and {point} would share the folder "
                                     f"{name}")
            runs[name] = (point, to_argv(flags))
        return runs

    def grid(self):
        """What makes two sweeps the same sweep (the manifest compares it)."""
        return json.loads(json.dumps(dict(axes=self.axes, flags=self.flags)))


def load_sweep_file(path):
    """A Sweep from a TOML (Python >= 3.11) or JSON file with tables `axes`, `flags`,
    `cim_eval` and `chip`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise NptwofoldError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:
            raise NptwofoldError(f"{path}: TOML sweep files need Python >= 3.11; write it as "
                                 "JSON (same tables)") from None
        try:
            content = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise NptwofoldError(f"{path} is not valid TOML: {exc}") from None
    elif path.suffix == ".json":
        try:
            content = json.loads(text)
        except ValueError as exc:
            raise NptwofoldError(f"{path} is not valid JSON: {exc}") from None
    else:
        raise NptwofoldError(f"sweep file {path} must end in .toml or .json")
    if not isinstance(content, dict):
        raise NptwofoldError(f"{path} must hold tables axes, flags, cim_eval and chip")
    unknown = set(content) - {"axes", "flags", "cim_eval", "chip"}
    if unknown:
        raise NptwofoldError(f"{path}: unknown table(s) {', '.join(sorted(unknown))} (known: "
                             "axes, flags, cim_eval, chip)")
    try:
        return Sweep(content.get("axes"), content.get("flags", {}), content.get("cim_eval", {}),
                     content.get("chip", {}))
    except NptwofoldError as exc:
        raise NptwofoldError(f"{path}: {exc}") from None


def check_run_flags(sweep):
    """Parses every run's flags with train_cifar.py's own parser, so that a typo ends the
    sweep before anything is queued rather than each run on its worker."""
    spec = importlib.util.spec_from_file_location("train_cifar", SCRIPTS / "train_cifar.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, (_, argv) in sweep.runs().items():
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                script.parse_args([*argv, "--out", name])
        except SystemExit:
            message = errors.getvalue().strip().removeprefix("error: ")
            raise NptwofoldError(f"run {name}: train_cifar.py refuses its flags: "
                                 f"{message.removesuffix(' (see --help)')}") from None


# --- the tasks (run on the workers; everything they read and write is in the run's folder) ---

def _last_line(path):
    with contextlib.suppress(OSError):
        lines = [line for line in Path(path).read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("# ")]
        if lines:
            return lines[-1].strip()
    return "(no output)"


def script_environment():
    """The worker's environment without MALLOC_TRIM_THRESHOLD_. Dask's nanny sets it (65536)
    for its workers; inherited, it turns off glibc's adaptive mmap threshold, so every array
    over 128 KiB that a training step allocates is mapped and faulted in afresh: a twofold run
    trained at 135 images/s with it and 205-220 without (docs/sweeps.md)."""
    return {name: value for name, value in os.environ.items()
            if name != "MALLOC_TRIM_THRESHOLD_"}


def _run_script(script, argv, log_path, workdir):
    """Runs scripts/SCRIPT with `argv` under the orphan guard, its output appended to
    `log_path`; raises NptwofoldError with the log's last line if it fails."""
    command = [sys.executable, "-c", ORPHAN_GUARD, str(os.getpid()), str(SCRIPTS / script),
               *argv]
    with open(log_path, "a") as log:
        log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} on "
                  f"{socket.gethostname()}: {script} {shlex.join(argv)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                              stdin=subprocess.DEVNULL, env=script_environment()).returncode
    if code:
        raise NptwofoldError(f"{script} exited with {code}: {_last_line(log_path)}")


def train_run(run_dir, argv, workdir, run_threads):
    """Trains (or continues, or skips when finished) one run; returns the seconds it trained
    (0 when skipped)."""
    run_dir = Path(run_dir)
    if (run_dir / DONE).exists():
        return 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # one run, or a phase of the twofold preset, saved: train_cifar.py checks that the flags
    # are the saved run's, skips finished phases and continues the current one
    resume = (run_dir / "last.h5").exists() or any(run_dir.glob("*/last.h5"))
    _run_script("train_cifar.py", [*argv, *(["--resume"] if resume else []), "--threads",
                                   str(run_threads), "--no-progress", "--out", str(run_dir)],
                run_dir / TRAIN_LOG, workdir)
    seconds = time.time() - started
    write_json(run_dir / DONE, dict(argv=argv, finished=datetime.datetime.now().isoformat(),
                                    host=socket.gethostname(), last_seconds=seconds))
    return seconds


def run_and_collect(run_dir, point, argv, cim_argv, workdir, run_threads):
    """One run's task: `train_run`, then `evaluate_run` on the same worker, so the run's rows
    arrive as soon as it is trained. Returns (seconds trained, rows)."""
    seconds = train_run(run_dir, argv, workdir, run_threads)
    return seconds, evaluate_run(run_dir, point, cim_argv, workdir, run_threads)


def final_folder(run_dir):
    """The folder of a run's last phase: the run itself, or the twofold preset's last phase."""
    from .config import TWOFOLD_PHASES

    run_dir = Path(run_dir)
    for folder in [run_dir] + [run_dir / name for name, _, _ in reversed(TWOFOLD_PHASES)]:
        if (folder / "summary.json").exists():
            return folder
    raise NptwofoldError(f"{run_dir} holds no summary.json")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NptwofoldError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                             ) from None


def evaluate_run(run_dir, point, cim_argv, workdir, run_threads):
    """The rows of one finished run: one per array variant that `cim_eval.py` ran, with the
    run's axis values, accuracies and bit statistics. The CIM report is kept in the run's
    folder and reused while the run and the flags are unchanged."""
    run_dir = Path(run_dir)
    final = final_folder(run_dir)
    report = cached_cim_eval(final / "last.h5", cim_argv, run_dir,
                             run_key(cim_argv, _read_json(run_dir / DONE)), workdir, run_threads)
    return run_rows(run_dir, point, final, report)


def evaluate_reference(out, sweep, workdir, run_threads):
    """The reference chip's `cim_eval.py --json` report, on the runs' images, kept in
    OUT/reference/ and reused while the checkpoint and the flags are unchanged."""
    folder = Path(out) / REFERENCE
    folder.mkdir(exist_ok=True)
    checkpoint, argv, key = reference_key(sweep, workdir)
    report = cached_cim_eval(checkpoint, argv, folder, key, workdir, run_threads)
    if len(report["runs"]) != 1:
        raise NptwofoldError("chip: reference-flags must give one encoding and one ADC width "
                             f"(cim_eval ran {len(report['runs'])} variants)")
    return report


def run_key(cim_argv, trained):
    """What a run's CIM report is computed from: the cim_eval flags and the run's DONE record."""
    return dict(cim_eval=cim_argv, trained=trained)


def reference_key(sweep, workdir):
    """(checkpoint, cim_eval flags, what its report is computed from) of the reference chip."""
    checkpoint = Path(workdir, sweep.chip["reference"])
    try:
        written = checkpoint.stat()
    except OSError as exc:
        raise NptwofoldError(f"reference chip {checkpoint}: {exc.strerror}") from None
    argv = to_argv({**{key: value for key, value in sweep.cim_eval.items()
                       if key in SAME_IMAGES}, **sweep.chip.get("reference_flags", {})})
    return checkpoint, argv, dict(cim_eval=argv, checkpoint=str(checkpoint),
                                  size=written.st_size, modified_ns=written.st_mtime_ns)


def cached_cim_eval(checkpoint, argv, folder, key, workdir, run_threads):
    """`cim_eval.py CHECKPOINT ARGV --json`'s report, kept in `folder` and reused while `key`
    (what it was computed from) is unchanged."""
    folder = Path(folder)
    if not ((folder / CIM_REPORT).exists() and (folder / CIM_KEY).exists()
            and _read_json(folder / CIM_KEY) == key):
        _run_script("cim_eval.py", [str(checkpoint), *argv, "--threads", str(run_threads),
                                    "--no-progress", "--json", str(folder / CIM_REPORT)],
                    folder / CIM_LOG, workdir)
        write_json(folder / CIM_KEY, key)
    return _read_json(folder / CIM_REPORT)


def chip_rows(rows, chip, reference=None):
    """Each run's row per encoding on the chip it would be built as: the narrowest ADC width
    whose accuracy is within chip["adc_tolerance"] points of the ideal ADC's (the ideal row
    when no width is, or without a tolerance). With the `reference` chip's report, each gets its total energy's ratio
    to the reference chip's and its accuracy lost against the reference model's float
    accuracy, in points."""
    tolerance = chip.get("adc_tolerance")
    groups = {}
    for row in rows:
        groups.setdefault((row["run"], row["encoding"]), []).append(row)
    picked = []
    for group in groups.values():
        ideal = [row for row in group if row["adc_bits"] == 0]
        finite = sorted((row for row in group if row["adc_bits"]), key=lambda r: r["adc_bits"])
        within = [row for row in finite if tolerance is not None and ideal
                  and row["cim_acc"] >= ideal[0]["cim_acc"] - tolerance / 100]
        picked.append(dict((within or ideal or finite[-1:])[0]))
    if reference is not None:
        reference_nj = reference["runs"][0]["total"]["total_pj"] / 1e3
        for row in picked:
            row.update(acc_lost_pt=100 * (reference["accuracy"]["float"] - row["cim_acc"]),
                       reference_nj=reference_nj, reference_ratio=reference_nj
                       / row["energy_nj"])
    return picked


def run_rows(run_dir, point, final, cim_report):
    """Rows of a run from its files: summary.json, twofold_report.json (if twofold) and the
    `cim_eval.py --json` report."""
    summary = _read_json(final / "summary.json")
    row = dict(run=Path(run_dir).name, **point, test_acc=summary["final_test_acc"])
    post = summary.get("post_training")
    if post:
        row.update(acc_before_post=post["accuracy_before"],
                   acc_after_prune=post["accuracy_after_prune"])
    if (final / "twofold_report.json").exists():
        total = _read_json(final / "twofold_report.json")[-1]["layers"][-1]
        row.update(network_sparsity=total["network_sparsity"],
                   zero_bit_share=total["zero_bit_share"], cells_00_share=total["cells_00"])
    rows = []
    for variant in cim_report["runs"]:
        energy = variant["total"]
        rows.append(dict(
            row, encoding=variant["encoding"],
            adc=f"{variant['adc_bits']}-bit {variant['adc_range']}" if variant["adc_bits"]
            else "ideal",
            adc_bits=variant["adc_bits"], cim_acc=variant["accuracy"],
            energy_nj=energy["total_pj"] / 1e3,
            cells_nj=energy["cells_pj"] / 1e3, adc_nj=energy["adc_pj"] / 1e3,
            lfsr_nj=energy["lfsr_pj"] / 1e3, baseline_nj=energy["baseline_total_pj"] / 1e3,
            cell_reads_00=energy["cells_00"], energy_ratio=energy["baseline_ratio"],
            cim_images=cim_report["n_images"]))
    return rows


# --- the sweep folder ---

@contextlib.contextmanager
def sweep_lock(out):
    """Holds OUT/sweep.lock (flock) for the sweep's life: a second sweep on the folder stops
    with one line naming the holder."""
    path = Path(out) / LOCK
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            raise NptwofoldError(f"{out} is in use by another sweep ({handle.read().strip()}); "
                                 "wait for it to end or choose another --out") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def open_sweep_folder(out, sweep, check_flags=False):
    """Checks OUT against its manifest and writes the manifest of a new sweep (after
    `check_run_flags` if `check_flags`: a refused grid leaves no manifest behind); returns the
    sweep (the manifest's when `sweep` is None, for --collect-only)."""
    manifest = Path(out) / MANIFEST
    if manifest.exists():
        saved = _read_json(manifest)
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise NptwofoldError(f"{manifest} is not a sweep manifest (format {FORMAT})")
        if sweep is None:
            return Sweep(saved["axes"], saved["flags"], saved.get("cim_eval", {}),
                         saved.get("chip", {}))
        stored = dict(axes=saved["axes"], flags=saved["flags"])
        if stored != sweep.grid():
            differ = [flag_name(name) for part in ("axes", "flags")
                      for name in sorted(set(stored[part]) | set(sweep.grid()[part]))
                      if stored[part].get(name) != sweep.grid()[part].get(name)]
            raise NptwofoldError(f"{out} holds a different sweep ({', '.join(differ)} differ); "
                                 "choose another --out")
    else:
        if sweep is None:
            raise NptwofoldError(f"{out} holds no sweep ({MANIFEST}): give the sweep file or "
                                 "--axis flags")
        foreign = sorted(entry.name for entry in Path(out).iterdir() if entry.name != LOCK)
        if foreign:
            raise NptwofoldError(f"{out} holds files but no {MANIFEST} ({foreign[0]}, ...): "
                                 "not a sweep folder; choose a new or empty --out")
    if check_flags:
        check_run_flags(sweep)
    write_json(manifest, dict(format=FORMAT, version=1, **sweep.grid(), cim_eval=sweep.cim_eval,
                              chip=sweep.chip,
                              runs=list(sweep.runs())))
    return sweep


# --- clusters ---

def _dask():
    try:
        import distributed
    except ImportError:
        raise NptwofoldError(INSTALL_HINT) from None
    return distributed


def usable_cores():
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_cluster(workers=None, run_threads=1, dashboard_address=":8787", lost_workers=10):
    """A LocalCluster of one-thread worker processes, one per `run_threads` cores."""
    distributed = _dask()
    import dask

    dask.config.set({"distributed.scheduler.allowed-failures": lost_workers})
    return distributed.LocalCluster(
        n_workers=workers or max(1, usable_cores() // run_threads), threads_per_worker=1,
        processes=True, memory_limit=0, dashboard_address=dashboard_address,
        preload=[WORKER_CTRL_C])


def jobqueue_cluster(kind, run_threads=1, queue=None, account=None, walltime=None,
                     memory=None, job_extra=(), prologue=(), lost_workers=10,
                     dashboard_address=":8787"):
    """A dask-jobqueue cluster whose jobs are one worker process each: `run_threads` cores
    reserved, one task thread (a run at a time). Options not given come from the jobqueue
    configuration (~/.config/dask/jobqueue.yaml)."""
    _dask()
    import dask

    try:
        import dask_jobqueue
    except ImportError:
        raise NptwofoldError(INSTALL_HINT) from None
    if kind not in CLUSTERS:
        raise NptwofoldError(f"--cluster must be one of {', '.join(CLUSTERS)} (got {kind!r})")
    dask.config.set({"distributed.scheduler.allowed-failures": lost_workers})
    cls = getattr(dask_jobqueue, f"{kind.upper()}Cluster")
    # SGE and LSF call the account a project
    given = {"queue": queue, "project" if kind in ("sge", "lsf") else "account": account,
             "walltime": walltime, "memory": memory}
    config = dask.config.get(f"jobqueue.{kind}", {})
    options = {name: value for name, value in given.items() if value is not None}
    options.setdefault("memory", config.get("memory") or "4GB")
    # the job reserves the run's cores; `--nthreads 1` (the last one given wins) keeps the
    # worker to one run at a time
    extra_args = [*(config.get("worker-extra-args") or []), "--nthreads", "1"]
    try:
        return cls(cores=run_threads, processes=1, worker_extra_args=extra_args,
                   job_extra_directives=[*(config.get("job-extra-directives") or []),
                                         *job_extra],
                   job_script_prologue=[*(config.get("job-script-prologue") or []), *prologue],
                   scheduler_options=dict(dashboard_address=dashboard_address), **options)
    except (ValueError, TypeError) as exc:
        raise NptwofoldError(f"--cluster {kind}: {exc}") from None


def connect(address):
    distributed = _dask()
    try:
        return distributed.Client(address, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise NptwofoldError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


# --- the client side ---

def _duration(seconds):
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


class Progress:
    """Counts of the runs and, after the first trained run, an ETA; printed when they change
    and at least every `every` seconds."""

    def __init__(self, total, print_line, every):
        self.total, self.print_line, self.every = total, print_line, every
        self.durations, self.last, self.last_time = [], None, 0.0

    def update(self, done, running, failed, slots):
        waiting = self.total - done - failed
        eta = ""
        if self.durations and waiting:
            eta = (", ETA " + _duration(sum(self.durations) / len(self.durations)
                                        * math.ceil(waiting / max(slots, 1))))
        line = (f"runs: {done}/{self.total} done, {running} running, {failed} failed, "
                f"{waiting - running} waiting{eta}")
        if line != self.last or time.time() - self.last_time >= self.every:
            self.print_line(line)
            self.last, self.last_time = line, time.time()


def _failure(future, run_dir):
    """One line on a failed task: its error, or the worker losses and the log's last line."""
    if future.status == "cancelled":
        return f"cancelled by the scheduler; last log line: {_last_line(run_dir / TRAIN_LOG)}"
    error = future.exception()
    if isinstance(error, NptwofoldError):
        return str(error)
    return f"{type(error).__name__}: {error}; last log line: {_last_line(run_dir / TRAIN_LOG)}"


def run_sweep(sweep, out, open_client, collect_only=False, retries=2, run_threads=1,
              progress_every=60, print_line=print):
    """Trains the runs not finished yet and collects each one once trained (`cim_eval.py`),
    rewriting the tables and plots as rows come in. `sweep` None takes the sweep recorded in
    `out` (for collect_only); open_client(number of runs) gives the Dask client, called once
    the folder and the flags passed their checks. Returns (rows, {run: failure line})."""
    out = Path(out).resolve()
    check_output_dir(out)
    with sweep_lock(out):
        sweep = open_sweep_folder(out, sweep, check_flags=not collect_only)
        runs = sweep.runs()
        distributed = _dask()
        client = open_client(len(runs))
        workdir = os.getcwd()
        cim_argv = to_argv(sweep.cim_eval)
        if client.dashboard_link:
            print_line(f"dashboard: {client.dashboard_link}")
        failures, rows, tasks = {}, {}, {}
        reference_report, reference_pending = None, bool(sweep.chip.get("reference"))
        if reference_pending:
            tasks[client.submit(evaluate_reference, str(out), sweep, workdir, run_threads,
                                key=f"reference-{time.time_ns()}", retries=retries,
                                pure=False)] = REFERENCE

        def write_outputs():
            """The tables and plots of the rows collected so far (the chips once the
            reference chip is known); returns the rows and the lines that say what was
            written (or why the plots were not)."""
            ordered = [row for name in runs if name in rows for row in rows[name]]
            if not ordered:
                return ordered, []
            write_tables(out, TABLE, ordered, sweep)
            written = [f"table: {out / TABLE}.md (.csv, .json)"]
            plotted, variant_keys = ordered, ("encoding", "adc")
            if sweep.chip and not reference_pending:
                plotted, variant_keys = chip_rows(ordered, sweep.chip, reference_report), \
                    ("encoding",)
                write_tables(out, CHIPS, plotted, sweep, [*sweep.axes, *CHIP_COLUMNS])
                written.append(f"chips: {out / CHIPS}.md (.csv, .json)")
            plots = draw_plots(out, plotted, sweep, variant_keys, reference_report)
            if plots is None:
                written.append("matplotlib is not installed: plots skipped (pip install "
                               "matplotlib)")
            elif plots:
                written.append(f"plots: {', '.join(plots)}")
            return ordered, written

        for name, (point, argv) in runs.items():
            if not collect_only:
                tasks[client.submit(run_and_collect, str(out / name), point, argv, cim_argv,
                                    workdir, run_threads, key=f"run-{name}-{time.time_ns()}",
                                    retries=retries, pure=False)] = name
            elif (out / name / DONE).exists():
                tasks[client.submit(evaluate_run, str(out / name), point, cim_argv, workdir,
                                    run_threads, key=f"collect-{name}-{time.time_ns()}",
                                    retries=retries, pure=False)] = name
            else:
                print_line(f"{name}: not finished, left out of the table")
        progress = Progress(0 if collect_only else len(runs), print_line, progress_every)
        done = failed = 0
        try:
            while tasks:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # distinct < 3.11
                    distributed.wait(list(tasks), timeout=1, return_when="FIRST_COMPLETED")
                ended = [future for future in tasks if future.status in ENDED]
                for future in ended:
                    name = tasks.pop(future)
                    folder = out / name
                    if name == REFERENCE:
                        reference_pending = False
                    if future.status != "finished":
                        failures[name] = _failure(future, folder)
                        if name == REFERENCE:
                            print_line(f"reference chip failed: {failures[name]} (log: "
                                       f"{folder / CIM_LOG})")
                        else:
                            failed += 1
                            print_line(f"failed {name}: {failures[name]} (logs: "
                                       f"{folder / TRAIN_LOG}, {CIM_LOG})")
                    elif name == REFERENCE:
                        reference_report = future.result()
                    elif collect_only:
                        rows[name] = future.result()
                        print_line(f"collected {name}")
                    else:
                        seconds, rows[name] = future.result()
                        done += 1
                        if seconds:
                            progress.durations.append(seconds)
                        print_line(f"trained and collected {name}")
                if ended and tasks:
                    write_outputs()
                if progress.total:
                    processing = {key for keys in client.processing().values() for key in keys}
                    slots = sum(client.nthreads().values())
                    # a worker may hold more tasks than it has threads, queued
                    running = min(sum(future.key in processing for future, name in tasks.items()
                                      if name != REFERENCE), slots)
                    progress.update(done, running, failed, slots)
        except KeyboardInterrupt:
            # Ctrl-C reaches the trainers too, which save their position and exit: a cancelled
            # task is not retried, so none starts again before the cluster closes
            client.cancel(list(tasks))
            raise
        ordered, lines = write_outputs()
        for line in lines:
            print_line(line)
        if not ordered and not failures:
            raise NptwofoldError(f"no finished runs in {out}")
        return ordered, failures


def _cell(value):
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def write_tables(out, name, rows, sweep, shown=None):
    """OUT/NAME.csv and .json with every column of `rows`, and OUT/NAME.md with the
    columns `shown` (all by default)."""
    columns = [column for column in shown or dict.fromkeys(key for row in rows for key in row)
               if any(column in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |"
              for row in rows]
    text = "\n".join(lines) + "\n"
    atomic_write(out / f"{name}.md", lambda tmp: Path(tmp).write_text(text))
    write_csv(out / f"{name}.csv", rows)
    write_json(out / f"{name}.json", dict(**sweep.grid(), cim_eval=sweep.cim_eval,
                                          chip=sweep.chip, rows=rows))


def pareto_front(points):
    """The (energy, accuracy) points no other point beats in both (less energy and at least
    the accuracy, or the same energy and more accuracy), by rising energy."""
    front = []
    for energy, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((energy, accuracy))
    return front


def draw_plots(out, rows, sweep, variant_keys=("encoding", "adc"), reference=None):
    """`<axis>.png`: accuracy and energy per image against the first numeric axis, one line
    per value of the other axes and of the row keys `variant_keys`; `accuracy_vs_energy.png`:
    every row, with the Pareto front. The reference chip's report, when given, is drawn as a
    line (energy) and a point. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return None

    def plain_log_ticks(axis):
        # energies span more than a decade but rarely two: label 1, 2 and 5 of each decade
        axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())

    numeric = [axis for axis, values in sweep.axes.items() if all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)]
    others = [axis for axis in sweep.axes if axis not in numeric[:1]] + list(variant_keys)
    series = {}
    for row in rows:
        label = ", ".join(f"{row[key]}" for key in others if key in row)
        series.setdefault(label, []).append(row)
    reference_point = None
    if reference is not None:
        reference_point = (reference["runs"][0]["total"]["total_pj"] / 1e3,
                           reference["runs"][0]["accuracy"])
    written = []

    def save(figure, file):
        figure.tight_layout()
        atomic_write(out / file, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
        plt.close(figure)
        written.append(file)

    if numeric:
        x_key = numeric[0]
        figure, (accuracy_axis, energy_axis) = plt.subplots(1, 2, figsize=(10, 4))
        for label, points in series.items():
            points = sorted(points, key=lambda row: row[x_key])
            xs = [row[x_key] for row in points]
            accuracy_axis.plot(xs, [row["cim_acc"] for row in points], "o-", label=label)
            energy_axis.plot(xs, [row["energy_nj"] for row in points], "o-", label=label)
        if reference_point:
            energy_axis.axhline(reference_point[0], color="gray", linestyle="--",
                                label="reference chip")
        accuracy_axis.set(xlabel=x_key, ylabel="test accuracy on the array")
        energy_axis.set(xlabel=x_key, ylabel="energy per image (nJ)", yscale="log")
        plain_log_ticks(energy_axis.yaxis)
        for axis in (accuracy_axis, energy_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        save(figure, f"{x_key}.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        axis.plot([row["energy_nj"] for row in points], [row["cim_acc"] for row in points],
                  "o", label=label)
    everything = [(row["energy_nj"], row["cim_acc"]) for row in rows]
    if reference_point:
        axis.plot(*reference_point, "k*", markersize=10, label="reference chip")
        everything.append(reference_point)
    front = pareto_front(everything)
    axis.plot([p[0] for p in front], [p[1] for p in front], "k-", alpha=0.4, linewidth=1,
              label="Pareto front")
    axis.set(xlabel="energy per image (nJ)", ylabel="test accuracy on the array", xscale="log")
    plain_log_ticks(axis.xaxis)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    save(figure, "accuracy_vs_energy.png")
    return written
