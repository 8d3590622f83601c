"""Command-line scripts end to end: a real (tiny) run, evaluation, inspection, bad input."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, as_from_a_terminal, assert_one_line_error, run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(REPO / "scripts/train_cifar.py", "--preset", "quick", "--epochs", "1", "--warmup-epochs",
        "0", "--threads", "1", "--no-progress", "--out", out)
    return out


def test_quick_run_writes_logs_and_checkpoints(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["config"]["data"] == "sample"
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    assert (quick_run / "last.h5").exists() and (quick_run / "log.csv").exists()


def test_evaluate_json_matches_the_training_log(quick_run):
    result = run(REPO / "scripts/evaluate.py", quick_run / "last.h5", "--json", "--threads", "1")
    report = json.loads(result.stdout)
    assert set(report) == {"accuracy", "loss", "n"} and report["n"] == 500
    history = json.loads((quick_run / "log.json").read_text())
    assert report["accuracy"] == history[-1]["test_acc"]
    assert report["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)


def test_inspect_lists_the_checkpoint(quick_run):
    listing = run("-m", "nptwofold.inspect", quick_run / "last.h5").stdout
    assert "layer3.2.conv2.weight" in listing and "(64, 64, 3, 3)" in listing
    assert "/optimizer/" in listing and "preset = quick" in listing


def test_plot_curves_reads_the_log_and_refuses_what_is_not_one(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    out = run(REPO / "scripts/plot_curves.py", quick_run, "--out", tmp_path / "c.png").stdout
    history = json.loads((quick_run / "log.json").read_text())
    assert f"last test accuracy {history[-1]['test_acc']:.4f}" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for bad, fragment in ((tmp_path / "none", "not found"),
                          (tmp_path / "other.csv", "is not a training log")):
        result = run(REPO / "scripts/plot_curves.py", bad, "--out", tmp_path / "d.png",
                     check=False)
        assert_one_line_error(result, fragment)


def test_resume_of_a_finished_run_and_refusal_to_overwrite(quick_run):
    again = run(REPO / "scripts/train_cifar.py", "--out", quick_run, "--no-progress", check=False)
    assert_one_line_error(again, "already holds a run")
    resumed = run(REPO / "scripts/train_cifar.py", "--out", quick_run, "--resume", "--lr", "0.5",
                  check=False)
    assert_one_line_error(resumed, "drop --lr")
    finished = run(REPO / "scripts/train_cifar.py", "--out", quick_run, "--resume",
                   "--no-progress").stdout
    assert ("finished earlier, skipped (1 of 1 epochs; to train it longer: --resume --epochs N "
            "with N > 1)") in finished
    assert "resuming" not in finished


def test_resume_with_more_epochs_trains_a_finished_run_longer(quick_run, tmp_path):
    shutil.copytree(quick_run, tmp_path / "run")
    result = run(REPO / "scripts/train_cifar.py", "--out", tmp_path / "run", "--resume",
                 "--epochs", "2", "--threads", "1", "--no-progress")
    assert "at epoch 2 of 2" in result.stdout and "cosine schedule is recomputed" in result.stdout
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["config"]["epochs"] == 2


def test_output_path_is_absolute_and_a_failed_run_leaves_no_folder(tmp_path):
    result = subprocess.run([sys.executable, REPO / "scripts/train_cifar.py", "--out",
                             "new/run", "--data", "missing-data"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert_one_line_error(result, "CIFAR-10 data not found at missing-data")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    result = run(REPO / "scripts/train_cifar.py", "--out", tmp_path / "kept/run", "--data",
                 tmp_path / "missing-data", check=False)
    assert not (tmp_path / "kept/run").exists() and (tmp_path / "kept").is_dir()


def test_a_missing_dependency_is_one_line_naming_it(tmp_path):
    """tqdm hidden: a path with the other three packages and no site-packages (-S)."""
    import h5py
    import numba
    import numpy

    for module in (numpy, numba, h5py):
        (tmp_path / module.__name__).symlink_to(Path(module.__file__).parent)
    for command in ([REPO / "scripts/evaluate.py", "x.h5"], ["-m", "nptwofold.inspect", "x.h5"]):
        result = subprocess.run([sys.executable, "-S", *command], cwd=REPO, capture_output=True,
                                text=True, timeout=600,
                                env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
        assert_one_line_error(result, "nptwofold needs tqdm, which")
        assert f"-m pip install -e {REPO}" in result.stderr


def test_a_folder_or_a_json_file_given_as_checkpoint_is_named_for_what_it_is(quick_run):
    for tool in ([REPO / "scripts/evaluate.py"], ["-m", "nptwofold.inspect"]):
        folder = run(*tool, quick_run, check=False)
        assert_one_line_error(folder, f"is a folder, not a checkpoint file; give "
                              f"{quick_run / 'last.h5'}")
        log = run(*tool, quick_run / "log.json", check=False)
        assert_one_line_error(log, "log.json is not an HDF5 file")


@pytest.mark.parametrize("script", ["train_cifar", "evaluate", "cim_eval", "adc_finetune",
                                    "cim_mask_groups", "sweep", "bench", "make_sample"])
def test_help_shows_a_value_for_every_default(script):
    text = " ".join(run(REPO / f"scripts/{script}.py", "--help").stdout.split())
    defaults = re.findall(r"\(default:? ([^)]*)\)", text)
    assert defaults and all(value.strip() for value in defaults), defaults
    assert "config's)" not in text and "SPEC values" not in text


def test_training_help_shows_each_presets_value():
    text = " ".join(run(REPO / "scripts/train_cifar.py", "--preset", "short", "--help")
                    .stdout.split())
    assert "(default: quick: 15; short: 10; long: 150; paper: 182)" in text
    assert "(default: quick: sample; short, long, paper: cifar10)" in text
    assert "usage: python -m nptwofold.inspect" in run("-m", "nptwofold.inspect", "--help").stdout


@pytest.mark.parametrize("args,fragment", [
    (["--threads", "0"], "--threads must be >= 1 (got 0)"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--lr", "-1"], "--lr must be > 0 (got -1.0)"),
    (["--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["--epochs", "1"], "--epochs 1 is too short for the quick preset's --warmup-epochs 1"),
    (["--data", "/nonexistent/cifar.tar.gz"], "not found"),
    (["--resume", "/nonexistent/last.h5"], "checkpoint not found"),
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1) (got 1.0)"),
    (["--sparsity", "-0.2"], "--sparsity must be in [0, 1) (got -0.2)"),
    (["--weight-bits", "7"], "--weight-bits 7: weight bit width b=7 is odd"),
    (["--weight-bits", "18"], "outside 2..16"),
    (["--hw", "weight_bits=4"], "--hw weight_bits: use --weight-bits"),
    (["--hw", "cell_energy_pj=[1, 2]"], "cell_energy_pj [1.0, 2.0]: needs 4 energies"),
    (["--preset", "twofold", "--epochs", "3"], "drop --epochs"),
    (["--preset", "twofold", "--resume"], "nothing to resume in"),
    (["--twofold-epochs", "3"], "--twofold-epochs belong to --preset twofold"),
    (["--finetune-beta-bit", "0"], "--finetune-beta-bit belong to --preset twofold"),
    (["--preset", "twofold", "--finetune-epochs", "-1"], "--finetune-epochs must be >= 0 (got -1)"),
    (["--init", "/nonexistent/base.h5", "--sparsity", "0.5"], "checkpoint not found"),
])
def test_bad_training_flags_give_one_line_errors(tmp_path, args, fragment):
    result = run(REPO / "scripts/train_cifar.py", "--out", tmp_path / "x", *args, check=False)
    assert_one_line_error(result, fragment)


def test_evaluate_truncated_checkpoint_gives_one_line_error(quick_run, tmp_path):
    raw = (quick_run / "last.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[:4000])
    result = run(REPO / "scripts/evaluate.py", tmp_path / "cut.h5", check=False)
    assert_one_line_error(result, "truncated or corrupt")


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_every_flag_has_help_with_its_default_and_version_works(script):
    # ScriptParser refuses to build a parser with an argument that has no help text
    help_text = run(REPO / "scripts" / script, "--help").stdout
    assert "--version" in help_text
    assert run(REPO / "scripts" / script, "--version").stdout.startswith("nptwofold ")


SCRIPTS_WITH_MAIN = sorted(p.name for p in (REPO / "scripts").glob("*.py")
                           if "\ndef main(" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS_WITH_MAIN)
def test_ctrl_c_ends_every_script_in_one_line_with_status_130(script):
    """A real SIGINT, raised as the script reads its flags (as if typed then)."""
    patch = ("from nptwofold.options import ScriptParser\n"
             "ScriptParser.parse_args = lambda *a, **k: signal.raise_signal(signal.SIGINT)")
    result = subprocess.run(as_from_a_terminal([REPO / "scripts" / script], patch),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), result.stderr


def test_script_parser_shows_defaults_and_refuses_a_flag_without_help():
    from nptwofold.options import ScriptParser

    parser = ScriptParser("demo")
    parser.add_argument("--width", type=int, default=8, help="bits")
    assert parser.parse_args([]).width == 8
    assert "bits (default: 8)" in parser.format_help()
    parser.add_argument("--depth", type=int, default=3)
    with pytest.raises(TypeError, match="--depth has no help"):
        parser.parse_args([])


def test_make_sample_rebuilds_the_committed_sample_byte_for_byte(tmp_path):
    # the sample holds exactly the images per class that make_sample takes, so it is its own
    # source; no temporary file is left beside the output
    out = tmp_path / "sample.tar.xz"
    run(REPO / "scripts/make_sample.py", REPO / "datasets/cifar10-sample.tar.xz", "--out", out)
    assert out.read_bytes() == (REPO / "datasets/cifar10-sample.tar.xz").read_bytes()
    assert [path.name for path in tmp_path.iterdir()] == ["sample.tar.xz"]
