"""Reliability: interrupted runs resume bit for bit, diverged runs stop cleanly, crafted
checkpoints are refused in one line (a fuzz test over a real twofold checkpoint's entries), a
resume with other flags and a second writer are refused, checkpoints that reach outside
themselves and data that would be coerced are refused, outputs are checked before any work."""
import errno
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import REPO, assert_one_line_error, run
from nptwofold import checkpoint, files, train
from nptwofold import data as data_module
from nptwofold.checkpoint import store_group
from nptwofold.config import TrainConfig
from nptwofold.data import load_cifar10
from nptwofold.errors import NptwofoldError
from nptwofold.train import Trainer

TIMING = ("seconds", "img_per_s", "epoch_seconds")  # wall-clock figures differ between runs


def tiny_config(**overrides):
    return TrainConfig.from_preset("quick", **{**dict(epochs=3, batch_size=16, eval_batch_size=10,
                                                      warmup_epochs=0, seed=3), **overrides})


def run_outputs(folder):
    """Every array of last.h5 and best.h5 (BN statistics included), their /train attributes,
    and the logs, without the timing figures."""
    def without_timing(value):
        if isinstance(value, list):
            return [without_timing(item) for item in value]
        if isinstance(value, dict):
            return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
        return value

    outputs = {}
    for name in ("last.h5", "best.h5"):
        with h5py.File(folder / name, "r") as f:
            f.visititems(lambda key, node: outputs.__setitem__(f"{name}/{key}", node[()])
                         if isinstance(node, h5py.Dataset) else None)
            for key, value in f["train"].attrs.items():
                if key not in TIMING:
                    outputs[f"{name}/train@{key}"] = without_timing(
                        json.loads(value) if isinstance(value, str) else value)
    for name in ("log.json", "summary.json"):
        outputs[name] = without_timing(json.loads((folder / name).read_text()))
    return outputs


def assert_same_outputs(folder, reference):
    outputs = run_outputs(folder)
    assert outputs.keys() == reference.keys()
    for key, value in reference.items():
        assert np.array_equal(outputs[key], value) if isinstance(value, np.ndarray) else \
            outputs[key] == value, key
    assert not list(folder.glob("*.tmp")), "stale temporary files are left"


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted run and the names of its checkpoint writes, in order."""
    folder = tmp_path_factory.mktemp("reference")
    writes = []
    real_write = checkpoint.atomic_write
    checkpoint.atomic_write = lambda path, write: (writes.append(path.name),
                                                   real_write(path, write))
    try:
        Trainer(tiny_config(), tiny_dataset, folder, progress=False).run()
    finally:
        checkpoint.atomic_write = real_write
    return run_outputs(folder), writes


def test_ctrl_c_inside_a_step_resumes_bit_for_bit(reference, tiny_dataset, tmp_path, monkeypatch):
    """Ctrl-C arrives after the forward pass of epoch 2's second step moved the BN statistics;
    the step finishes, and last.h5 holds the position after it."""
    calls, real_step = [], train.train_step

    def step_interrupted_after_forward(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            forward = model.forward

            def forward_then_ctrl_c(images):
                logits = forward(images)
                os.kill(os.getpid(), signal.SIGINT)
                return logits
            model.forward = forward_then_ctrl_c
        try:
            return real_step(model, *args, **kwargs)
        finally:
            model.__dict__.pop("forward", None)

    monkeypatch.setattr(train, "train_step", step_interrupted_after_forward)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(), tiny_dataset, tmp_path, progress=False).run()
    monkeypatch.undo()
    resumed = Trainer.resume(tmp_path / "last.h5", tiny_dataset, tmp_path, progress=False)
    assert (resumed.state["epoch"], resumed.state["step"]) == (1, 2)
    resumed.run()
    assert_same_outputs(tmp_path, reference[0])


def test_a_kill_during_any_checkpoint_write_resumes_bit_for_bit(reference, tiny_dataset,
                                                               tmp_path, monkeypatch):
    """A kill -9 while last.h5 or best.h5 is written, at the writes below: the
    folder is copied as the kill leaves it (new file complete under .tmp, not renamed), and
    --resume from that copy must end exactly like the uninterrupted run."""
    outputs, writes = reference
    assert "best.h5" in writes and "last.h5" in writes
    # the first write (nothing to resume yet), and the last write of each checkpoint
    kills = {0, len(writes) - 1 - writes[::-1].index("best.h5"),
             len(writes) - 1 - writes[::-1].index("last.h5")}
    for index in sorted(kills):
        name = writes[index]
        run_folder, killed = tmp_path / f"run{index}", tmp_path / f"killed{index}"
        count, real_write = [], checkpoint.atomic_write

        def write_then_kill(path, write):
            def write_and_copy(tmp):
                write(tmp)
                count.append(1)
                if len(count) == index + 1:
                    shutil.copytree(run_folder, killed)
            real_write(path, write_and_copy)

        monkeypatch.setattr(checkpoint, "atomic_write", write_then_kill)
        Trainer(tiny_config(), tiny_dataset, run_folder, progress=False).run()
        monkeypatch.undo()
        assert list(killed.glob(f"{name}.*.tmp")), "the kill leaves the temporary file"
        if (killed / "last.h5").exists():
            Trainer.resume(killed / "last.h5", tiny_dataset, killed, progress=False).run()
        else:  # killed during the first write: nothing to resume, the run starts again
            Trainer(tiny_config(), tiny_dataset, killed, progress=False).run()
        assert_same_outputs(killed, outputs)


def test_divergence_stops_with_the_last_good_checkpoints(tiny_dataset, tmp_path, monkeypatch):
    real_rate = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda config, step, per_epoch: (
        math.inf if step >= 4 else real_rate(config, step, per_epoch)))  # epoch 2, step 2
    trainer = Trainer(tiny_config(), tiny_dataset, tmp_path, progress=False)
    with pytest.raises(NptwofoldError, match=r"^training diverged at epoch 2, step 2: "):
        trainer.run()
    last = checkpoint.load_checkpoint(tmp_path / "last.h5")
    assert last["train"]["epoch"] == 1
    assert all(np.isfinite(value).all() for value in last["model"].values())
    assert json.loads((tmp_path / "summary.json").read_text())["epochs_done"] == 1


# ---- fuzz: every way an entry of a real checkpoint can be wrong -------------------------------

ADC_HISTOGRAM = "adc_histogram.sign_magnitude.128x128"


@pytest.fixture(scope="module")
def twofold_checkpoint(tiny_dataset, tmp_path_factory):
    """A real twofold checkpoint (2-bit, so small) with a /cim group of activation clips and
    cached ADC histograms."""
    root = tmp_path_factory.mktemp("fuzz")
    common = dict(epochs=1, warmup_epochs=0)
    Trainer(tiny_config(**common), tiny_dataset, root / "base", progress=False).run()
    trainer = Trainer(tiny_config(**common, lr=0.01, init=str(root / "base/last.h5"),
                                  twofold=dict(sparsity=0.5), hardware=dict(weight_bits=2)),
                      tiny_dataset, root / "twofold", progress=False)
    trainer.run()
    path = root / "twofold/last.h5"

    def fill_clips(group):
        group.attrs.update(activation_bits=8, weight_bits=2, calibration_images=8)
        for name in trainer.method.layers:
            layer = group.create_group(name)
            layer.attrs["activation_clip"] = 1.5
            layer.create_dataset(ADC_HISTOGRAM, data=np.arange(12, dtype=np.int64).reshape(3, 4))
    store_group(path, "cim", fill_clips)
    return path


def loaded(path, dataset):
    """Everything a resume reads from `path`, as comparable values."""
    content = checkpoint.load_checkpoint(path)
    trainer = Trainer.resume(path, dataset, progress=False)
    arrays = {**{f"model/{k}": v for k, v in trainer.model.state_arrays()},
              **{f"optimizer/{k}": v for k, v in trainer.optimizer.velocity.items()}}
    return dict(arrays={k: v.copy() for k, v in arrays.items()},
                state=json.dumps(trainer.state, sort_keys=True),
                config=repr(trainer.config), cim=repr(content["cim"]),
                dropped={k: layer.dropped_planes for k, layer in trainer.method.layers.items()})


def without_histogram(path, place):
    """repr of the /cim content of `path` less the ADC histogram at `place` ("cim/<layer>/...")."""
    cim = checkpoint.load_checkpoint(path)["cim"]
    _, layer, key = place.split("/")
    del cim["layers"][layer][key]
    return repr(cim)


def fuzzed_entries(path):
    """(place, is a dataset) of the entries to corrupt: all of them with NPTWOFOLD_FULL_FUZZ=1,
    else every entry outside the per-layer groups and every entry of the layers conv1 (a
    twofold layer) and bn1, the other layers' entries going through the same code."""
    full = os.environ.get("NPTWOFOLD_FULL_FUZZ") == "1"
    layers = ("conv1", "bn1")
    entries = []

    def chosen(name):
        leaf = name.split("/", 1)[1] if name.count("/") else ""
        return full or not leaf or leaf.startswith(layers)

    with h5py.File(path, "r") as f:
        entries += [("/", key, False) for key in f.attrs]
        for group in ("model", "optimizer", "train", "twofold", "cim"):
            def visit(name, node, group=group):
                place = f"{group}/{name}"
                if chosen(place):
                    entries.append((place, None, isinstance(node, h5py.Dataset)))
                    entries.extend((place, key, False) for key in node.attrs)
            entries.extend((group, key, False) for key in f[group].attrs)
            f[group].visititems(visit)
    return [(place, key) for place, key, is_dataset in entries if is_dataset or key]


def corruptions(value):
    """(how, corrupted value or None to delete) for a stored value."""
    array = np.asarray(value)
    yield "deleted", None
    yield "string", "corrupt"
    if array.dtype.kind in "iuf":
        yield "other dtype", array.astype(np.float64 if array.dtype.kind != "f" else np.int64)
        yield "other shape", array.reshape(-1)[:-1] if array.size > 1 else np.stack([array] * 2)
    if array.dtype.kind == "f":
        nan = array.copy()
        nan.reshape(-1)[0] = np.nan
        yield "NaN", nan
    if array.dtype.kind in "iu" and array.size:
        yield "out of range", np.full_like(array, np.iinfo(array.dtype).max
                                           if array.dtype.kind == "u" else -100)
    if array.dtype.kind in "U" or isinstance(value, str):
        yield "other type", 3


def corrupt(path, place, key, how, value):
    with h5py.File(path, "r+") as f:
        node = f[place] if place != "/" else f
        if key is not None:
            if value is None:
                del node.attrs[key]
            else:
                node.attrs[key] = value
            return
        attrs = dict(node.attrs)
        del f[place]
        if how == "group":
            f.create_group(place)
        elif value is not None:
            f.create_dataset(place, data=value)
            f[place].attrs.update(attrs)


@pytest.mark.slow
def test_fuzzed_checkpoints_are_refused_in_one_line_or_load_identically(twofold_checkpoint,
                                                                       tiny_dataset, tmp_path):
    original = loaded(twofold_checkpoint, tiny_dataset)
    entries = fuzzed_entries(twofold_checkpoint)
    assert len(entries) > 40
    tried = refused = 0
    with h5py.File(twofold_checkpoint, "r") as f:
        stored = {(place, key): (f[place] if place != "/" else f).attrs[key] if key
                  else f[place][()] for place, key in entries}
    for (place, key), value in stored.items():
        cases = list(corruptions(value)) + ([] if key else [("group", None)])
        for how, bad in cases:
            path = tmp_path / "fuzzed.h5"
            shutil.copyfile(twofold_checkpoint, path)
            corrupt(path, place, key, how, bad)
            tried += 1
            try:
                result = loaded(path, tiny_dataset)
            except NptwofoldError as exc:
                message = str(exc)
                assert "\n" not in message and str(path) in message, (place, key, how, message)
                refused += 1
                continue
            # accepted: then it must be an entry the loader does not read, with the same result,
            # or a cached ADC histogram, which is optional (recounted when missing)
            assert result["state"] == original["state"], (place, key, how)
            assert result["config"] == original["config"], (place, key, how)
            assert result["dropped"] == original["dropped"]
            if how == "deleted" and place.endswith(ADC_HISTOGRAM):
                assert result["cim"] == without_histogram(twofold_checkpoint, place)
            else:
                assert result["cim"] == original["cim"], (place, key, how)
            for name, array in original["arrays"].items():
                assert np.array_equal(result["arrays"][name], array), (place, key, how, name)
    print(f"{tried} corruptions, {refused} refused")
    assert refused > 0.8 * tried, (refused, tried)


def test_twofold_levels_that_disagree_with_weight_bits_are_refused(twofold_checkpoint,
                                                                   tiny_dataset, tmp_path):
    """Each stored view of a layer's weights changed by one level, within range and dtype."""
    for key in ("levels", "bit_planes", "weight"):
        path = tmp_path / f"{key}.h5"
        shutil.copyfile(twofold_checkpoint, path)
        with h5py.File(path, "r+") as f:
            data = f[f"twofold/conv1/{key}"]
            changed = data[()]
            flat = changed.reshape(-1)
            flat[0] = 1 - flat[0] if key == "bit_planes" else flat[0] + (1 if key == "levels"
                                                                           else 0.25)
            data[...] = changed
        with pytest.raises(NptwofoldError, match=f"/twofold/conv1/{key} does not agree"):
            Trainer.resume(path, tiny_dataset, progress=False)


# ---- resume with other flags, one writer per run folder ---------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    """A finished one-epoch float run on the sample's config (data 'sample')."""
    folder = tmp_path_factory.mktemp("finished")
    Trainer(tiny_config(epochs=1), tiny_dataset, folder, progress=False).run()
    return folder


@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "0.5"], "which has --lr 0.1 (given: 0.5); drop --lr"),
    (["--seed", "3", "--batch-size", "32"], "--batch-size 16 (given: 32); drop --batch-size"),
    (["--weight-bits", "4", "--sparsity", "0.9"], "--sparsity none (a float run) (given: 0.9), "
                                                  "--weight-bits 8 (given: 4)"),
    (["--preset", "short"], "--preset quick (given: short)"),
])
def test_a_resume_with_other_flags_is_refused_naming_them(finished_run, flags, fragment):
    result = run(REPO / "scripts/train_cifar.py", "--out", finished_run, "--resume",
                 "--no-progress", *flags, check=False)
    assert_one_line_error(result, fragment)


def test_a_resume_of_a_checkpoint_without_out_writes_beside_it(finished_run, tmp_path):
    result = subprocess.run([sys.executable, REPO / "scripts/train_cifar.py", "--resume",
                             finished_run / "last.h5", "--no-progress"], cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    assert "finished earlier" in result.stdout and str(finished_run) in result.stdout
    assert not (tmp_path / "runs").exists()


def test_a_resume_with_the_saved_flags_goes_on(finished_run):
    result = run(REPO / "scripts/train_cifar.py", "--out", finished_run, "--resume", "--seed",
                 "3", "--lr", "0.1", "--no-progress")
    assert "finished earlier" in result.stdout


def pipeline_phases(out, *flags):
    """The (folder, TrainConfig) of each phase of `--preset twofold --out OUT FLAGS...`."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_cifar
    finally:
        sys.path.pop(0)
    return train_cifar.phase_configs(train_cifar.parse_args(
        ["--preset", "twofold", "--out", str(out), *map(str, flags)]), Path(out))


def test_the_twofold_learning_rate_reaches_both_phases_and_not_the_baseline(tmp_path):
    phases = pipeline_phases(tmp_path, "--data", "sample", "--twofold-lr", "0.03")
    assert [(folder.name, config.lr) for folder, config in phases] == [
        ("baseline", 0.1), ("twofold", 0.03), ("post", 0.03)]
    assert [config.lr for _, config in pipeline_phases(tmp_path, "--data", "sample")][1:] == [
        0.01, 0.01]


def test_the_teacher_reaches_every_phase(tmp_path):
    phases = pipeline_phases(tmp_path, "--data", "sample", "--teacher", "dense.h5",
                             "--distill-weight", "0.5")
    assert [(folder.name, config.teacher, config.distill_weight) for folder, config in phases] == [
        ("baseline", "dense.h5", 0.5), ("twofold", "dense.h5", 0.5), ("post", "dense.h5", 0.5)]


@pytest.fixture(scope="module")
def finished_pipeline(finished_run, tiny_dataset, tmp_path_factory):
    """A finished twofold pipeline from --init FINISHED_RUN (no baseline phase), trained on the
    tiny slice with exactly the phase configs the script derives from its flags."""
    out = tmp_path_factory.mktemp("pipeline")
    flags = ("--data", "sample", "--init", finished_run / "last.h5", "--weight-bits", "2",
             "--finetune-epochs", "0")
    for folder, config in pipeline_phases(out, *flags):
        Trainer(config, tiny_dataset, folder, progress=False).run()
    return out, flags


@pytest.mark.parametrize("flags,fragment", [
    (["--weight-bits", "4", "--sparsity", "0.9", "--weight-encoding", "sign_magnitude"],
     "twofold was run with --sparsity 0.5 (given: 0.9), --weight-encoding twos_complement "
     "(given: sign_magnitude), --weight-bits 2 (given: 4)"),
    (["--weight-bits", "2", "--finetune-epochs", "1"],
     "post was run with --finetune-epochs 0 (given: 1)"),
    (["--weight-bits", "2", "--finetune-epochs", "0", "--twofold-epochs", "2"],
     "twofold was run with --twofold-epochs 1 (given: 2)"),
    (["--weight-bits", "2", "--finetune-epochs", "0", "--twofold-lr", "0.05"],
     "twofold was run with --twofold-lr 0.01 (given: 0.05)"),
])
def test_a_pipeline_resume_with_other_flags_is_refused_naming_them(finished_pipeline, flags,
                                                                   fragment):
    out, saved = finished_pipeline
    result = run(REPO / "scripts/train_cifar.py", "--preset", "twofold", "--out", out,
                 "--resume", "--no-progress", *saved[:4], *flags, check=False)
    assert_one_line_error(result, fragment)


def test_a_pipeline_resume_rebuilds_a_garbage_summary_and_a_missing_report(finished_pipeline):
    out, flags = finished_pipeline
    reports = (out / "post/twofold_report.json").read_text()
    for text in ("", "garbage {"):
        (out / "twofold/summary.json").write_text(text)
        (out / "post/summary.json").write_text(text)
        (out / "post/twofold_report.json").unlink()
        result = run(REPO / "scripts/train_cifar.py", "--preset", "twofold", "--out", out,
                     "--resume", "--no-progress", *flags)
        assert result.stdout.count("finished earlier") == 2
        assert (out / "post/twofold_report.json").read_text() == reports
        assert json.loads((out / "twofold/summary.json").read_text())["epochs_done"] == 1


HOLD_LOCK = """
import sys, time
from nptwofold.files import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the run lock of tmp_path/run; killed (-9) at the end."""
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield folder, holder
    holder.kill()
    holder.wait()


def test_a_second_writer_is_refused_naming_the_holder(lock_holder, tiny_dataset):
    folder, holder = lock_holder
    with pytest.raises(NptwofoldError, match=rf"^{folder} is in use by another run \(pid "
                                             rf"{holder.pid} on {socket.gethostname()}\)"):
        Trainer(tiny_config(), tiny_dataset, folder, progress=False)
    result = run(REPO / "scripts/train_cifar.py", "--out", folder, "--epochs", "2",
                 "--warmup-epochs", "0", check=False)
    assert_one_line_error(result, f"(pid {holder.pid} on ")
    assert "data:" not in result.stdout, "the lock must be taken before any work"
    assert not (folder / "last.h5").exists()


def test_a_killed_writer_leaves_no_lock(lock_holder, tiny_dataset):
    folder, holder = lock_holder
    holder.kill()  # kill -9: nothing of the holder runs
    holder.wait()
    trainer = Trainer(tiny_config(epochs=1), tiny_dataset, folder, progress=False)
    trainer.run()
    assert (folder / "last.h5").exists()


WRITE_OTHER = """
import sys
from pathlib import Path
from nptwofold.files import atomic_write
atomic_write(sys.argv[1], lambda tmp: Path(tmp).write_text("other writer"))
"""


def test_two_writers_of_one_file_do_not_share_a_temporary(tmp_path):
    """A second process writes the same file while the first is inside its write (cim_eval
    caching a calibration in a training run's last.h5): both writes succeed whole."""
    target = tmp_path / "last.h5"

    def write_while_another_writes(tmp):
        Path(tmp).write_text("first writer")
        subprocess.run([sys.executable, "-c", WRITE_OTHER, str(target)], cwd=REPO, check=True)
    files.atomic_write(target, write_while_another_writes)
    assert target.read_text() == "first writer"
    assert not list(tmp_path.glob("*.tmp"))


# ---- checkpoints that reach outside themselves ------------------------------------------------

def external_link(f, place, other):
    del f[place]
    f[place] = h5py.ExternalLink(str(other), "/weights")


def soft_link(f, place, other):
    del f[place]
    f[place] = h5py.SoftLink("/model/bn1.weight")


def external_storage(f, place, other):
    data = f[place][()]
    del f[place]
    f.create_dataset(place, shape=data.shape, dtype=data.dtype,
                     external=[(str(other) + ".raw", 0, data.nbytes)])


def virtual_dataset(f, place, other):
    data = f[place][()]
    del f[place]
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[...] = h5py.VirtualSource(str(other), "/weights", shape=data.shape)
    f.create_virtual_dataset(place, layout)


def declared_huge(f, place, other):
    del f[place]
    f.create_dataset(place, shape=(10 ** 10,), dtype=np.uint8)  # no data stored: reads as 0


@pytest.mark.parametrize("craft,fragment", [
    (external_link, "/model/conv1.weight is a ExternalLink (to "),
    (soft_link, "/model/conv1.weight is a SoftLink"),
    (external_storage, "/model/conv1.weight keeps its data in an external file"),
    (virtual_dataset, "/model/conv1.weight is a virtual dataset"),
    (declared_huge, "/model/conv1.weight declares 10000000000 values"),
])
def test_a_checkpoint_reaching_outside_itself_is_refused_before_any_read(
        finished_run, tmp_path, monkeypatch, craft, fragment):
    path, other = tmp_path / "crafted.h5", tmp_path / "other.h5"
    shutil.copyfile(finished_run / "last.h5", path)
    with h5py.File(path, "r+") as f:
        weights = f["model/conv1.weight"][()]
        (tmp_path / "other.h5.raw").write_bytes(weights.tobytes())
        with h5py.File(other, "w") as source:
            source["weights"] = weights
        craft(f, "model/conv1.weight", other)
    result = run("-m", "nptwofold.inspect", path, check=False)
    assert_one_line_error(result, fragment)

    def no_read(*args):
        raise AssertionError("a dataset was read")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_read)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_read)
    with pytest.raises(NptwofoldError, match=f"^{path}: .*{fragment.split(' (')[0]}"):
        checkpoint.load_checkpoint(path)


# ---- data that would be coerced ----------------------------------------------------------------

def python_batches(folder, data, labels, n_test=2):
    """A python-layout CIFAR-10 folder whose data_batch_1 holds `data` and `labels`."""
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    test = np.zeros((n_test, 3072), np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": test, b"labels": [0] * n_test}))
    return folder


@pytest.mark.parametrize("data,labels,fragment", [
    (np.full((2, 3072), 0.5, np.float32), [1, 2], "pixels are float32, not integers in 0..255"),
    (np.full((2, 3072), 300, np.int64), [1, 2], "pixel value 300 is outside 0..255"),
    (np.full((2, 3072), -4, np.int16), [1, 2], "pixel value -4 is outside 0..255"),
    (np.zeros((2, 3072), np.uint8), [5.7, 2], "labels are not a list of integers"),
    (np.zeros((2, 3072), np.uint8), np.array([5.0, 2.0]), "labels are not a list of integers"),
    (np.zeros((2, 3072), np.uint8), [-1, 2], "label -1 outside 0..9"),
    (np.zeros((2, 3072), np.uint8), [3, 12], "label 12 outside 0..9"),
    (np.zeros((2, 3072), np.uint8), [3], "2 images with 1 labels"),
])
def test_python_batches_that_would_be_coerced_are_refused(tmp_path, data, labels, fragment):
    with pytest.raises(NptwofoldError, match=fragment):
        load_cifar10(python_batches(tmp_path / "py", data, labels))


def test_integer_pixels_in_range_load_unchanged(tmp_path):
    data = np.arange(2 * 3072).reshape(2, 3072) % 256
    loaded = load_cifar10(python_batches(tmp_path / "py", data.astype(np.int64), [1, 9]))
    assert loaded.train_images.dtype == np.uint8
    assert np.array_equal(loaded.train_images.transpose(0, 3, 1, 2).reshape(2, -1), data)
    assert loaded.train_labels.tolist() == [1, 9]


def test_a_tiny_pickle_declaring_many_images_is_refused_before_allocation(tmp_path):
    """Items of zero bytes (a structured dtype with an empty field) make an array of any shape
    in a few bytes, which a conversion to uint8 would fill with 921 MB of zeros."""
    empty_items = np.dtype([("pixel", np.uint8, (0,))])
    data = np.ndarray((300_000, 3072), dtype=empty_items)
    folder = python_batches(tmp_path / "py", data, [])
    assert (folder / "data_batch_1").stat().st_size < 400
    tracemalloc.start()
    try:
        with pytest.raises(NptwofoldError, match="declares 300000 images"):
            load_cifar10(folder)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


def binary_tar(path, members, complete=True):
    """A .tar of binary batches; without `complete`, cut after the last member (where a
    download can stop and still leave whole members)."""
    with tarfile.open(path, "w") as archive:
        for name, images in members.items():
            records = np.zeros((images, 3073), np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(records)
            archive.addfile(info, io.BytesIO(records))
        end = archive.offset
    if not complete:
        path.write_bytes(path.read_bytes()[:end])
    return path


def test_a_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    members = {"test_batch.bin": 3, "data_batch_1.bin": 4, "data_batch_2.bin": 4}
    assert len(load_cifar10(binary_tar(tmp_path / "whole.tar", members)).train_labels) == 8
    with pytest.raises(NptwofoldError, match="ends without the end-of-archive marker"):
        load_cifar10(binary_tar(tmp_path / "cut.tar", members, complete=False))


def test_a_missing_training_batch_is_refused(tmp_path):
    members = {"test_batch.bin": 3, "data_batch_1.bin": 4, "data_batch_3.bin": 4}
    with pytest.raises(NptwofoldError, match=r"training batches \[1, 3\] \(missing \[2\]"):
        load_cifar10(binary_tar(tmp_path / "gap.tar", members))


def test_data_beyond_the_loader_bound_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", 5 * 3073)
    members = {"test_batch.bin": 3, "data_batch_1.bin": 4}
    with pytest.raises(NptwofoldError, match="more than the 0 MiB this loader reads"):
        load_cifar10(binary_tar(tmp_path / "big.tar", members))


# ---- outputs checked before any work, sizes bounded --------------------------------------------

@pytest.mark.parametrize("script,flags,fragment", [
    ("cim_eval.py", ["--json", "/proc/nope/out.json"], "cannot write /proc/nope/out.json"),
    ("cim_eval.py", ["--csv", "{tmp}"], "it is a folder"),
    ("cim_eval.py", ["--plot", "{tmp}/file/plot.png"], "{tmp}/file is not a folder"),
    ("cim_mask_groups.py", ["--json", "/proc/nope/out.json"], "cannot write /proc/nope/out.json"),
    ("adc_finetune.py", ["--adc-bits", "4", "--out", "{tmp}/file"], "{tmp}/file is a file"),
])
def test_outputs_are_checked_before_any_work(tmp_path, script, flags, fragment):
    """The checkpoint does not exist: an output check that came after the work would report
    it instead."""
    (tmp_path / "file").write_text("")
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    result = run(REPO / "scripts" / script, tmp_path / "missing.h5", *flags, check=False)
    assert_one_line_error(result, fragment.replace("{tmp}", str(tmp_path)))


@pytest.mark.parametrize("script,flags,fragment", [
    ("train_cifar.py", ["--out", "{tmp}/o", "--batch-size", "20000"],
     "--batch-size must be in [1, 4096] (got 20000)"),
    ("train_cifar.py", ["--out", "{tmp}/o", "--eval-batch-size", "20000"],
     "must be in [1, 10000] (got 20000)"),
    ("evaluate.py", ["{tmp}/missing.h5", "--batch-size", "20000"], "must be <= 10000"),
    ("cim_eval.py", ["{tmp}/missing.h5", "--eval-batch-size", "20000"],
     "--eval-batch-size must be in [1, 10000] (got 20000)"),
    ("adc_finetune.py", ["{tmp}/missing.h5", "--adc-bits", "4", "--out", "{tmp}/o",
                         "--batch-size", "20000"], "must be <= 4096"),
    ("cim_eval.py", ["{tmp}/missing.h5", "--hw", "crossbar_rows=100000000"],
     "crossbar_rows must be in [1, 4096] (got 100000000)"),
    ("cim_eval.py", ["{tmp}/missing.h5", "--hw", "crossbar_cols=100000"],
     "crossbar_cols must be in [1, 4096] (got 100000)"),
])
def test_batch_and_crossbar_sizes_are_bounded(tmp_path, script, flags, fragment):
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    result = run(REPO / "scripts" / script, *flags, check=False)
    assert_one_line_error(result, fragment)


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    """An NFS mount with `nolock` refuses flock with ENOLCK: the run goes on, saying so."""
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with files.RunLock(tmp_path):
        pass
    assert "cannot be locked (No locks available); nothing stops a second run" in \
        capsys.readouterr().err


def test_a_stale_lock_file_of_a_dead_writer_is_taken_over(tmp_path):
    (tmp_path / files.LOCK_NAME).write_text("garbage left by a killed writer")
    with files.RunLock(tmp_path):
        holder = json.loads((tmp_path / files.LOCK_NAME).read_text())
    assert holder == dict(pid=os.getpid(), host=socket.gethostname())
