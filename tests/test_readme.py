"""The commands of README.md and docs/*.md run as written.

Convention (documented here, used in README.md and docs/*.md): a fenced code block whose
previous non-blank line is an HTML comment

    <!-- test -->            runs the block exactly as written;
    <!-- test: FLAGS -->     runs it with FLAGS appended to every command line of the block
                             (after joining backslash continuations). This is for commands
                             that take minutes as written, e.g. the quick preset's 15 epochs:
                             the test runs the README's text plus `--epochs 1 ...`, so the
                             command itself, its flags and its outputs are still checked;
    <!-- not run: REASON --> is not run, for the REASON given (e.g. it needs PyTorch).

In docs/*.md every code block carries one of these marks. README's unmarked blocks are not
run: they need the full CIFAR-10, or set up the environment (the README's test command is
checked against .ci/run instead). Every `--flag` of every `python scripts/NAME.py` line,
marked or not, must appear in that script's --help.

The marked blocks run in order, README.md first and then docs/*.md by name, in one temporary
folder that stands for a fresh clone with the virtual environment active (so a doc may use
what the README's commands wrote, as a reader who followed it has): `python` is this interpreter, `scripts/` links
to the repository's scripts, `results/short-seed0/` is a copy of the committed baseline (so a
command that writes into a checkpoint cannot change the repository), and outputs such as
`runs/` land in the temporary folder. Bash blocks run with `set -euo pipefail`, python blocks
with this interpreter.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

README = REPO / "README.md"
MAX_README_BYTES = 16 * 1024  # a guide with the headline tables; details live in docs/ and results/

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*test(?::\s*(.*?))?\s*-->\s*$")
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*-->\s*$")
DOCS = sorted((REPO / "docs").glob("*.md"))


def code_blocks(path, with_line_before=False):
    """[(language, code, marker)] in document order; marker is None, "" or the extra flags.
    `with_line_before` adds the non-blank line before each block."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = [line for line in text[:match.start()].splitlines() if line.strip()]
        mark = MARK.match(before[-1].strip()) if before else None
        block = (match.group(1), match.group(2), None if mark is None else (mark.group(1) or ""))
        blocks.append((*block, before[-1].strip() if before else "") if with_line_before
                      else block)
    return blocks


def command_lines(code):
    """The block's lines with backslash continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def with_flags(code, flags):
    if not flags:
        return code
    lines = []
    for line in command_lines(code):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert " #" not in line, f"a block with appended flags has a trailing comment: {line}"
            line = f"{line} {flags}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def fresh_clone(root):
    """A folder that looks like a fresh clone to the README's commands."""
    (root / "scripts").symlink_to(REPO / "scripts", target_is_directory=True)
    (root / "datasets").symlink_to(REPO / "datasets", target_is_directory=True)
    (root / "results").mkdir()
    shutil.copytree(REPO / "results/short-seed0", root / "results/short-seed0")
    return root


def environment():
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONHOME", None)
    return env


def run_block(language, code, cwd):
    if language == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-c", "set -euo pipefail\n" + code]
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (f"this block failed (exit {result.returncode}):\n{code}\n"
                                    f"--- stdout\n{result.stdout[-3000:]}\n"
                                    f"--- stderr\n{result.stderr[-3000:]}")
    return result


@pytest.mark.slow
def test_marked_blocks_run_as_written(tmp_path):
    root = fresh_clone(tmp_path)
    for document in (README, *DOCS):
        for language, code, flags in code_blocks(document):
            if flags is not None:
                run_block(language, with_flags(code, flags), root)
        if document == README:  # what the README says the commands write
            for name in ("runs/quick-seed0/last.h5", "runs/quick-seed0/summary.json",
                         "runs/twofold-sample/post/last.h5",
                         "runs/twofold-sample/post/twofold_report.csv",
                         "runs/twofold-sample/cim.json", "runs/twofold-sample/cim.csv"):
                assert (root / name).is_file(), name


@pytest.mark.parametrize("document", DOCS, ids=lambda path: path.name)
def test_every_docs_block_is_run_or_says_why_not(document):
    for language, code, flags, line_before in code_blocks(document, with_line_before=True):
        assert flags is not None or NOT_RUN.match(line_before), (
            f"{document.name}: mark this block <!-- test --> or <!-- not run: REASON -->:\n"
            f"{code[:200]}")


def test_readme_is_a_short_guide():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; keep it under 16 KB"
    text = README.read_text()
    for fragment in ("../shared", "/work/", "SPEC", "issue "):
        assert fragment not in text, f"README.md mentions {fragment!r}"
    assert "source .venv/bin/activate" in text


# a row of the README's results table: p, method, chip, accuracy, points lost, 00 cell reads,
# energy per image and the ratio to the reference chip
RESULTS_ROW = re.compile(r"^\| ([\d.]+) \| ([\w -]+?) \| (.+?) \| ([\d.]+) % \| (-?[\d.]+) \| "
                         r"([\d.]+) % \| ([\d.]+) uJ \| ([\d.]+)x \|$", re.M)
ENCODING_NAMES = dict(twos_complement="two's complement", sign_magnitude="sign-magnitude",
                      offset_binary="offset binary")


def test_readme_results_table_is_the_grid_chips_table():
    """Every row of the grid's chips.csv, and the reference chip's cim_eval report, appear in
    the README's table with the same figures (as rounded there), and no row more."""
    grid = REPO / "results/grid"
    with open(grid / "chips.csv", newline="") as f:
        rows = {(float(row["sparsity"]), row["method"]): row for row in csv.DictReader(f)}
    reference = json.loads((grid / "reference/cim_eval.json").read_text())
    dense = reference["accuracy"]["float"]
    [chip] = reference["runs"]
    rows[(0.0, "reference chip")] = dict(
        encoding=chip["encoding"], adc_bits=chip["adc_bits"], cim_acc=chip["accuracy"],
        acc_lost_pt=100 * (dense - chip["accuracy"]), cell_reads_00=chip["total"]["cells_00"],
        energy_nj=chip["total"]["total_pj"] / 1e3, reference_ratio=1.0)
    shown = RESULTS_ROW.findall(README.read_text())
    for p, method, chip_name, accuracy, lost, zeros, energy, ratio in shown:
        row = rows.pop((float(p), method), None)
        assert row is not None, f"README.md results row p = {p}, {method} is not in chips.csv"
        want = (f"{ENCODING_NAMES[row['encoding']]}, {row['adc_bits']}-bit ADC",
                f"{100 * float(row['cim_acc']):.2f}", f"{float(row['acc_lost_pt']):.2f}",
                f"{100 * float(row['cell_reads_00']):.1f}", f"{float(row['energy_nj']) / 1e3:.1f}",
                f"{float(row['reference_ratio']):.1f}")
        assert (chip_name, accuracy, lost, zeros, energy, ratio) == want, (p, method)
    assert not rows, f"chips.csv rows missing from README.md's results table: {sorted(rows)}"


def test_readme_test_command_is_the_ci_command():
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines()
          if line.startswith("python3 -m venv")]
    assert len(ci) == 1
    assert ci[0] in README.read_text()


def test_readme_links_exist():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (REPO / target).exists(), f"broken link {target}"


def test_readme_script_flags_exist():
    """Every --flag in a `python scripts/NAME.py` line is one the script accepts."""
    flags_of = {}
    for document in (README, REPO / "results/README.md", *DOCS):
        for _, code, _ in code_blocks(document):
            for line in command_lines(code):
                match = re.search(r"python (scripts/\w+\.py)(.*)", line)
                if not match:
                    continue
                script, args = match.groups()
                if script not in flags_of:
                    result = subprocess.run([sys.executable, str(REPO / script), "--help"],
                                            capture_output=True, text=True, timeout=120,
                                            env=environment())
                    assert result.returncode == 0, result.stderr
                    flags_of[script] = set(re.findall(r"--[\w-]+", result.stdout))
                used = set(re.findall(r"(?<!\S)--[\w-]+", args.split(" #")[0]))
                unknown = used - flags_of[script]
                assert not unknown, f"{document.name}: {script} has no {sorted(unknown)}"


def test_readme_training_commands_never_collide():
    """Followed in order, no README command that starts a run finds its folder taken (the
    set-up command once wrote the Quick start's folder, which then refused to train)."""
    folders = []
    for _, code, _ in code_blocks(README):
        for line in command_lines(code):
            match = re.search(r"python (?:\S*/)?scripts/train_cifar\.py(.*)", line)
            if not match or "--resume" in match.group(1):
                continue
            args = match.group(1).split(" #")[0].split()
            given = dict(zip(args, args[1:]))
            folders.append(given.get("--out", f"runs/{given.get('--preset', 'quick')}-seed"
                                              f"{given.get('--seed', '0')}"))
    assert len(folders) >= 5 and len(set(folders)) == len(folders), folders
