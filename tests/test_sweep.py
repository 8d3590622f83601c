"""Sweeps (nptwofold.sweep, scripts/sweep.py): the grid and its folders, the sweep folder's
manifest and lock, the orphan guard, a failing run, and on Dask a grid that survives a killed
worker with the same weights, and the job script of a batch queue."""
import csv
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from helpers import REPO, as_from_a_terminal, assert_one_line_error, run
from nptwofold import sweep as sweep_module
from nptwofold.errors import NptwofoldError
from nptwofold.sweep import (CLUSTERS, DONE, MANIFEST, ORPHAN_GUARD, TRAIN_LOG, Sweep,
                             check_run_flags, chip_rows, draw_plots, load_sweep_file,
                             open_sweep_folder, pareto_front, parse_value, run_sweep, sweep_lock,
                             train_run, write_tables)

TINY = dict(preset="quick", epochs=2, warmup_epochs=0)  # about 10 s of training per run


def test_run_folders_are_named_from_the_axes_and_flags_pass_through():
    sweep = Sweep(dict(sparsity=[0.5, 0.501], lambda_net=[0, 1e-4], nesterov=[True, False]),
                  dict(preset="twofold", milestones=[3, 5], method="energy"))
    runs = sweep.runs()
    assert len(runs) == 8 and len(set(runs)) == 8
    point, argv = runs["sparsity-0.501_lambda-net-0.0001_nesterov-false"]
    assert point == dict(sparsity=0.501, lambda_net=1e-4, nesterov=False)
    assert argv == ["--preset", "twofold", "--milestones", "3", "5", "--method", "energy",
                    "--sparsity", "0.501", "--lambda-net", "0.0001", "--no-nesterov"]
    assert list(runs)[0] == "sparsity-0.5_lambda-net-0_nesterov-true"  # first axis outermost


def test_an_axis_of_variants_sets_several_flags_per_run():
    """Reg_Bit off (beta 0) and on (beta 20 with its own fine-tune and precision budget)."""
    variants = [parse_value('{"name": "off", "beta-bit": 0}'),
                parse_value('{"name": "on", "beta-bit": 20, "finetune-beta-bit": 0, '
                            '"plane-drop-tolerance": 0.02}')]
    runs = Sweep(dict(sparsity=[0, 0.5], bitreg=variants), dict(preset="twofold")).runs()
    assert list(runs) == ["sparsity-0_bitreg-off", "sparsity-0_bitreg-on",
                          "sparsity-0.5_bitreg-off", "sparsity-0.5_bitreg-on"]
    point, argv = runs["sparsity-0.5_bitreg-on"]
    assert point == dict(sparsity=0.5, bitreg="on")
    assert argv == ["--preset", "twofold", "--sparsity", "0.5", "--beta-bit", "20",
                    "--finetune-beta-bit", "0", "--plane-drop-tolerance", "0.02"]
    assert runs["sparsity-0_bitreg-off"][1] == ["--preset", "twofold", "--sparsity", "0",
                                                "--beta-bit", "0"]


@pytest.mark.parametrize("axes,flags,fragment", [
    (dict(sparsity=[0.5, 0.5]), {}, "axis sparsity lists 0.5 twice"),
    (dict(sparsity=[0, 0.0]), {}, "axis sparsity lists 0.0 twice"),
    (dict(sparsity=[parse_value("0.5"), parse_value("0.50")]), {}, "lists 0.5 twice"),
    (dict(init=["a/b.h5", "a~b.h5"]), {}, "would share the folder init-a~b.h5"),
    (dict(sparsity=[0.5]), dict(sparsity=0.7), "an axis and a shared flag: --sparsity"),
    (dict(seed=[]), {}, "axis seed must be a non-empty list"),
    ({}, {}, "at least one axis"),
    (dict(seed=[0]), dict(out="x"), "--out cannot be set"),
    (dict(threads=[1, 2]), {}, "--threads cannot be set (use --run-threads)"),
    (dict(seed=[0]), dict(lr=float("nan")), "must be a number"),
    (dict(seed=[0]), {"lr rate": 1}, "is not a flag name"),
    (dict(seed=[0]), dict(cim_eval=dict(json="x.json")), "cim_eval: --json cannot be set"),
    (dict(bitreg=[dict(name="on", beta_bit=20), 0]), {}, "a variant must be a table with a name"),
    (dict(bitreg=[dict(name="on", beta_bit=20), dict(name="on", beta_bit=5)]), {},
     "axis bitreg: two variants are named 'on'"),
    (dict(beta_bit=[0, 5], bitreg=[dict(name="on", beta_bit=20)]), {},
     "set by two axes, or an axis and a shared flag: --beta-bit"),
    (dict(bitreg=[dict(name="on", out="x")]), {}, "--out cannot be set"),
])
def test_bad_grids_are_refused(axes, flags, fragment):
    cim_eval = flags.pop("cim_eval", {})
    with pytest.raises(NptwofoldError) as error:
        Sweep(axes, flags, cim_eval).runs()
    assert fragment in str(error.value)


def test_the_results_grid_file_and_its_json_twin(tmp_path):
    pytest.importorskip("tomllib")
    sweep = load_sweep_file(REPO / "sweeps/results.toml")
    runs = sweep.runs()
    assert len(runs) == 12
    point, argv = runs["sparsity-0.7_method-prune-only"]
    assert point == dict(sparsity=0.7, method="prune-only")
    assert argv[:2] == ["--preset", "twofold"] and "--init" in argv
    assert argv[-4:] == ["--sparsity", "0.7", "--method", "prune-only"]
    twin = tmp_path / "results.json"
    twin.write_text(json.dumps(dict(axes=sweep.axes, flags=sweep.flags, cim_eval=sweep.cim_eval)))
    assert load_sweep_file(twin).runs() == runs
    (tmp_path / "bad.json").write_text(json.dumps(dict(axes=dict(seed=[0]), flag={})))
    with pytest.raises(NptwofoldError, match="unknown table"):
        load_sweep_file(tmp_path / "bad.json")


def test_the_command_line_keeps_every_table_of_the_file_and_adds_its_flags():
    pytest.importorskip("tomllib")
    spec = importlib.util.spec_from_file_location("sweep_script", REPO / "scripts/sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = REPO / "sweeps/results.toml"
    args = script.parse_args([str(path), "--out", "unused", "--flag", "seed", "1",
                              "--eval", "images", "100"])
    given, stored = script.the_sweep(args), load_sweep_file(path)
    assert stored.chip and given.chip == stored.chip and given.axes == stored.axes
    assert given.flags == dict(stored.flags, seed=1)
    assert given.cim_eval == dict(stored.cim_eval, images=100)


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_every_committed_sweep_file_gives_runs_the_trainer_accepts(path):
    pytest.importorskip("tomllib")
    sweep = load_sweep_file(path)
    assert sweep.runs()
    check_run_flags(sweep)


def test_run_flags_are_checked_by_the_trainers_parser():
    check_run_flags(Sweep(dict(seed=[0, 1]), TINY))
    with pytest.raises(NptwofoldError, match="run seed-0: train_cifar.py refuses its flags: "
                       "unrecognized arguments: --epochz 3"):
        check_run_flags(Sweep(dict(seed=[0]), dict(epochz=3)))


def test_a_sweep_folder_refuses_another_sweep_and_a_second_holder(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    first = Sweep(dict(sparsity=[0.5, 0.7]), dict(bits=8))
    assert open_sweep_folder(out, first) is first
    assert open_sweep_folder(out, Sweep(dict(sparsity=[0.5, 0.7]), dict(bits=8))).axes
    with pytest.raises(NptwofoldError, match="holds a different sweep .--bits, --mask-group "
                       "differ.; choose another --out"):
        open_sweep_folder(out, Sweep(dict(sparsity=[0.5, 0.7]), dict(bits=4, mask_group=4)))
    assert open_sweep_folder(out, None).grid() == first.grid()  # --collect-only
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(NptwofoldError, match="holds files but no sweep.json"):
        open_sweep_folder(tmp_path / "other", first)
    (tmp_path / "typo").mkdir()
    with pytest.raises(NptwofoldError, match="refuses its flags"):
        open_sweep_folder(tmp_path / "typo", Sweep(dict(seed=[0]), dict(epochz=3)), True)
    assert not (tmp_path / "typo" / MANIFEST).exists()  # the corrected grid may use the folder
    with sweep_lock(out):
        with pytest.raises(NptwofoldError, match=f"in use by another sweep .pid {os.getpid()}"):
            with sweep_lock(out):
                pass
    with sweep_lock(out):  # released
        pass


def test_the_cli_refuses_a_different_sweep_in_one_line(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    open_sweep_folder(out, Sweep(dict(seed=[0, 1]), TINY))
    result = run(REPO / "scripts/sweep.py", "--out", out, "--axis", "seed", "0", "2",
                 "--flag", "preset", "quick",
                 check=False)
    assert_one_line_error(result, "holds a different sweep (--seed, --epochs, "
                          "--warmup-epochs differ)")
    assert_one_line_error(run(REPO / "scripts/sweep.py", "--out", tmp_path / "new", check=False),
                          "give a sweep file or --axis flags")
    assert_one_line_error(run(REPO / "scripts/sweep.py", "--out", tmp_path / "empty",
                              "--collect-only", check=False), "holds no sweep (sweep.json)")
    (tmp_path / "file").write_text("")
    assert_one_line_error(run(REPO / "scripts/sweep.py", "--out", tmp_path / "file", "--axis",
                              "seed", "0", check=False), "is a file")


def test_without_dask_the_sweep_says_how_to_install_it(tmp_path):
    argv = ["sweep.py", "--out", str(tmp_path / "sweep"), "--axis", "seed", "0"]
    code = ("import runpy, sys\n"
            "sys.modules['distributed'] = None  # import distributed raises ImportError\n"
            f"sys.argv = {argv!r}\n"
            f"runpy.run_path({str(REPO / 'scripts/sweep.py')!r}, run_name='__main__')\n")
    assert_one_line_error(run("-c", code, check=False), "pip install -e '.[cluster]'")


def test_the_orphan_guard_ends_the_child_when_its_parent_is_killed(tmp_path):
    """A parent (standing in for a Dask worker) starts a child under the guard and is killed
    with SIGKILL: the child must not outlive it."""
    child_script = tmp_path / "child.py"
    child_script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    parent_code = ("import os, subprocess, sys\n"
                   f"subprocess.run([sys.executable, '-c', {ORPHAN_GUARD!r}, str(os.getpid()), "
                   f"{str(child_script)!r}])\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid):
    """False once `pid` has exited (a zombie no one reaped counts as exited)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_scripts_run_without_the_nannys_malloc_setting(tmp_path, monkeypatch):
    """Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_; the trainer must not inherit
    it (it makes every large array a fresh mmap), the rest of the environment it must."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("NPTWOFOLD_PROBE", "kept")
    monkeypatch.setattr(sweep_module, "SCRIPTS", tmp_path)
    (tmp_path / "show_env.py").write_text(
        "import os\nprint(os.environ.get('MALLOC_TRIM_THRESHOLD_'), "
        "os.environ.get('NPTWOFOLD_PROBE'))\n")
    sweep_module._run_script("show_env.py", [], tmp_path / "log", tmp_path)
    assert (tmp_path / "log").read_text().splitlines()[-1] == "None kept"


def test_a_failing_run_raises_its_last_log_line(tmp_path):
    with pytest.raises(NptwofoldError, match="train_cifar.py exited with 1: error: .*"
                       "/nonexistent/cifar.tar.gz"):
        train_run(tmp_path / "run", ["--data", "/nonexistent/cifar.tar.gz"], str(REPO), 1)
    assert not (tmp_path / "run" / DONE).exists()
    assert (tmp_path / "run" / TRAIN_LOG).read_text().startswith("# ")


def test_the_cli_reports_a_run_failed_after_its_retries(tmp_path):
    pytest.importorskip("distributed")
    result = run(REPO / "scripts/sweep.py", "--out", tmp_path / "sweep", "--axis", "seed", "0",
                 "--flag", "data", "/nonexistent/cifar.tar.gz", "--workers", "1",
                 "--retries", "1", "--dashboard", ":0", check=False)
    assert result.returncode == 1
    assert "error: 1 run(s) failed: seed-0" in result.stderr
    assert "failed seed-0: train_cifar.py exited with 1: error: " in result.stdout
    log = (tmp_path / "sweep" / "seed-0" / TRAIN_LOG).read_text()
    assert log.count("# ") == 2  # tried twice: once and one retry



@pytest.mark.slow
def test_ctrl_c_saves_the_runs_and_ends_the_sweep_in_one_line(tmp_path):
    """Ctrl-C in a terminal signals the sweep's whole process group: the trainer saves its
    position, the sweep says so in one line and exits 130, no worker prints a traceback, and
    the interrupted run is not started again (its log has one start)."""
    pytest.importorskip("distributed")
    out = tmp_path / "sweep"
    argv = [REPO / "scripts/sweep.py", "--out", out, "--axis", "seed", "0",
            "--flag", "preset", "quick", "--flag", "epochs", "40", "--flag", "warmup-epochs",
            "0", "--workers", "1", "--dashboard", ":0"]
    sweep = subprocess.Popen(as_from_a_terminal(argv), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = out / "seed-0" / TRAIN_LOG
    deadline = time.time() + 300
    while not (log.exists() and "epoch 1:" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGINT)
    output, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, output
    assert "interrupted: the runs in progress saved their position" in output
    assert "Traceback" not in output, output
    text = log.read_text()
    assert text.count("train_cifar.py") == 1, text
    assert "interrupted; position saved" in text
    assert (out / "seed-0" / "last.h5").exists() and not (out / "seed-0" / DONE).exists()


# --- on Dask ---

def final_arrays(path):
    """Every dataset of a checkpoint (model, optimizer, twofold), by name."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    from nptwofold.sweep import local_cluster

    cluster = local_cluster(workers=2, dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def kill_a_worker_mid_run(client, out, killed):
    """Waits until a run has written its first epoch, then SIGKILLs the worker running it
    (the nanny starts a new one); records the run and the trainer process it ran."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline:
        for run_dir in sorted(out.glob("*/last.h5")):
            name = run_dir.parent.name
            if (out / name / DONE).exists():
                continue
            for address, keys in client.processing().items():
                if any(key.startswith(f"run-{name}-") for key in keys):
                    pid = client.run(os.getpid, workers=[address])[address]
                    killed.update(run=name, trainers=[
                        child.pid for child in psutil.Process(pid).children(recursive=True)])
                    os.kill(pid, signal.SIGKILL)
                    return
        time.sleep(0.1)


@pytest.mark.slow
def test_a_grid_survives_a_killed_worker_with_the_same_weights(dask_client, tmp_path):
    """2 x 2 quick runs on 2 worker processes; one worker is killed during a run's second
    epoch. The run continues from its first epoch on a new worker, the trainer of the killed
    worker does not live on, and every final checkpoint equals the one of the same grid run
    without the kill. Each run is collected once trained, so the table holds rows before the
    last run is done; in the end, one row per run."""
    sweep = Sweep(dict(seed=[0, 1], lr=[0.1, 0.05]), TINY,
                  dict(images=20, calib_images=16))
    killed, lines, table_written = {}, [], []

    def print_line(line):
        lines.append(line)
        table_written.append((tmp_path / "killed" / "results.md").exists())

    killer = threading.Thread(target=kill_a_worker_mid_run,
                              args=(dask_client, tmp_path / "killed", killed))
    killer.start()
    rows, failures = run_sweep(sweep, tmp_path / "killed", lambda n_runs: dask_client,
                               progress_every=5, print_line=print_line)
    killer.join()
    assert killed and not failures, (killed, failures, lines)
    last = max(i for i, line in enumerate(lines) if line.startswith("trained and collected"))
    assert table_written[last], lines
    assert not any(_alive(pid) for pid in killed["trainers"])
    log = (tmp_path / "killed" / killed["run"] / TRAIN_LOG).read_text()
    assert "resuming" in log and "at epoch 2" in log, log
    assert [row["run"] for row in rows] == list(sweep.runs())
    for row in rows:
        summary = json.loads((tmp_path / "killed" / row["run"] / "summary.json").read_text())
        assert row["test_acc"] == summary["final_test_acc"] and row["cim_images"] == 20
        assert row["energy_nj"] == pytest.approx(row["cells_nj"] + row["adc_nj"]
                                                 + row["lfsr_nj"])
    table = (tmp_path / "killed" / "results.md").read_text()
    assert all(f"| {name} |" in table for name in sweep.runs())
    assert any(line.startswith("runs: 4/4 done, 0 running, 0 failed") for line in lines)

    # the same runs, the same task, no kill
    reference = tmp_path / "reference"
    dask_client.gather([dask_client.submit(train_run, str(reference / name), argv, str(REPO), 1,
                                           pure=False)
                        for name, (_, argv) in sweep.runs().items()])
    for name in sweep.runs():
        got = final_arrays(tmp_path / "killed" / name / "last.h5")
        want = final_arrays(reference / name / "last.h5")
        # the collection added its calibration cache (/cim) to the killed sweep's checkpoints
        assert {key for key in got if not key.startswith("cim/")} == set(want)
        for key in want:
            assert np.array_equal(got[key], want[key]), (name, key)

    # finished runs are skipped; --collect-only rebuilds the table from the kept reports
    manifest = (tmp_path / "killed" / MANIFEST).read_text()
    again, failures = run_sweep(None, tmp_path / "killed", lambda n_runs: dask_client,
                                collect_only=True, print_line=lines.append)
    assert again == rows and not failures
    assert (tmp_path / "killed" / MANIFEST).read_text() == manifest


@pytest.mark.parametrize("kind", CLUSTERS)
def test_a_batch_queue_job_starts_one_single_threaded_worker(kind):
    """The job script dask-jobqueue would submit (nothing is submitted): the queue options
    reach it, and the worker command it runs, read by dask-worker's own parser, starts one
    worker of one thread (a run at a time) on this scheduler."""
    pytest.importorskip("dask_jobqueue")
    from distributed.cli.dask_worker import main as dask_worker

    from nptwofold.sweep import jobqueue_cluster

    cluster = jobqueue_cluster(kind, run_threads=2, queue="cpu", account="lab",
                               walltime="02:00:00", memory="8GB",
                               prologue=["source /shared/nptwofold/.venv/bin/activate"],
                               dashboard_address=":0")
    try:
        script = cluster.job_script()
        assert "source /shared/nptwofold/.venv/bin/activate" in script
        assert "cpu" in script and "02:00" in script
        if kind == "slurm":
            assert "#SBATCH -p cpu" in script and "#SBATCH -A lab" in script
            assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH -t 02:00:00" in script
        command = shlex.split(next(line for line in script.splitlines()
                                   if "distributed.cli.dask_worker" in line))
        assert command[0] == sys.executable
        options = dask_worker.make_context(
            "dask-worker", command[command.index("distributed.cli.dask_worker") + 1:]).params
        assert options["scheduler"] == cluster.scheduler_address
        assert options["nthreads"] == 1 and options["nanny"]
    finally:
        cluster.close()


def chip_test_rows():
    """Rows of two runs as run_rows makes them: ideal and finite ADC widths, two encodings."""
    rows = []
    for run_name, accuracies in (("a", {0: 0.90, 4: 0.80, 5: 0.896, 6: 0.899, 8: 0.90}),
                                 ("b", {0: 0.70, 4: 0.60, 5: 0.61, 8: 0.692})):
        for encoding in ("sign_magnitude", "twos_complement"):
            for bits, accuracy in accuracies.items():
                if encoding == "twos_complement":
                    accuracy -= 0.1 * (bits not in (0, 8))  # only 8 bits keeps it
                rows.append(dict(run=run_name, encoding=encoding, adc_bits=bits, cim_acc=accuracy,
                                 energy_nj=100.0 + bits))
    return rows


def test_each_run_gets_the_narrowest_adc_within_the_tolerance():
    picked = {(row["run"], row["encoding"]): row["adc_bits"]
              for row in chip_rows(chip_test_rows(), dict(adc_tolerance=0.5))}
    # run a: 5 bits is 0.4 points below ideal; b: no width within 0.5 points but 8 bits
    # (0.692 against 0.70 is 0.8 points), so its chip keeps the ideal ADC's row
    assert picked == {("a", "sign_magnitude"): 5, ("a", "twos_complement"): 8,
                      ("b", "sign_magnitude"): 0, ("b", "twos_complement"): 0}
    wider = {(row["run"], row["encoding"]): row["adc_bits"]
             for row in chip_rows(chip_test_rows(), dict(adc_tolerance=1.0))}
    assert wider[("b", "sign_magnitude")] == 8 and wider[("a", "sign_magnitude")] == 5
    assert {row["adc_bits"] for row in chip_rows(chip_test_rows(), {})} == {0}


def test_chips_compare_with_the_reference_chip():
    reference = dict(accuracy=dict(float=0.91), runs=[dict(total=dict(total_pj=420e3))])
    for row in chip_rows(chip_test_rows(), dict(adc_tolerance=0.5), reference):
        assert row["reference_ratio"] == pytest.approx(420.0 / row["energy_nj"])
        assert row["acc_lost_pt"] == pytest.approx(100 * (0.91 - row["cim_acc"]))


def test_the_chips_table_shows_the_headline_columns_and_keeps_every_one(tmp_path):
    sweep = Sweep(dict(sparsity=[0.5], method=["a"]), TINY)
    row = dict(run="r", sparsity=0.5, method="a", encoding="sign_magnitude", cim_acc=0.8523,
               energy_nj=61234.56, cells_nj=58000.0, hidden=1.5, acc_lost_pt=3.96)
    write_tables(tmp_path, "chips", [row], sweep, ["sparsity", "method", "encoding", "adc",
                                                   "cim_acc", "acc_lost_pt", "energy_nj"])
    header, _, line = (tmp_path / "chips.md").read_text().splitlines()
    # a column no row holds (adc) is left out; 1,000 and more print as whole numbers
    assert header == "| sparsity | method | encoding | cim_acc | acc_lost_pt | energy_nj |"
    assert line == "| 0.5 | a | sign_magnitude | 0.8523 | 3.96 | 61235 |"
    with open(tmp_path / "chips.csv") as f:
        assert next(csv.DictReader(f)) == {key: str(value) for key, value in row.items()}
    assert json.loads((tmp_path / "chips.json").read_text())["rows"] == [row]


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [(5.0, 0.80), (1.0, 0.70), (2.0, 0.70), (3.0, 0.85), (1.0, 0.60), (4.0, 0.84)]
    # a brute-force check of the definition beside the expected front
    beaten = {p for p in points for q in points if q != p and q[0] <= p[0] and q[1] >= p[1]
              and (q[0] < p[0] or q[1] > p[1])}
    assert pareto_front(points) == sorted(set(points) - beaten) == [(1.0, 0.70), (3.0, 0.85)]


def test_the_plots_are_written_per_axis_and_against_energy(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = Sweep(dict(sparsity=[0.0, 0.5], method=["a", "b"]), TINY)
    rows = [dict(sparsity=p, method=m, encoding="sign_magnitude", cim_acc=0.9 - p / 10,
                 energy_nj=100 * (1 - p) + (m == "b")) for p in (0.0, 0.5) for m in "ab"]
    reference = dict(runs=[dict(accuracy=0.91, total=dict(total_pj=420e3))])
    written = draw_plots(tmp_path, rows, sweep, ("encoding",), reference)
    assert written == ["sparsity.png", "accuracy_vs_energy.png"]
    for file in written:
        assert (tmp_path / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("chip,cim_eval,fragment", [
    (dict(adc_tolerance=0.5), {}, "needs cim_eval adc-bits listing the ideal ADC (0)"),
    (dict(adc_tolerance=0.5), dict(adc_bits=[4, 5]), "listing the ideal ADC (0)"),
    (dict(adc_tolerance=-1), dict(adc_bits=[0, 5]), "adc-tolerance must be a number of points"),
    (dict(reference_flags=dict(adc_bits=8)), {}, "reference-flags need a reference"),
    (dict(reference="x.h5", reference_flags=dict(json="r.json")), {}, "--json cannot be set"),
    (dict(margin=1), {}, "unknown key(s) margin"),
])
def test_bad_chip_tables_are_one_line(chip, cim_eval, fragment):
    with pytest.raises(NptwofoldError) as error:
        Sweep(dict(seed=[0]), TINY, cim_eval, chip)
    assert fragment in str(error.value)
