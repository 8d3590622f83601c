"""The thread pool: chunking, exceptions, and training that is bit-identical at any thread count.

Thread counts are read when NumPy and Numba load, so each count trains in its own process.
"""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import REPO

from nptwofold.threads import CHUNK_IMAGES, image_chunks, run_parallel, scratch


# 5 Nesterov-SGD steps of ResNet-20 on 20 augmented sample images (chunks of 8, 8 and 4), plain
# or with the Twofold method (argument 2); prints the losses and a digest of every weight,
# buffer and momentum buffer
TRAIN_FIVE_STEPS = """
import hashlib, json, sys
from nptwofold.threads import configure_threads
configure_threads(int(sys.argv[1]))
import numpy as np
from nptwofold.data import load_sample
from nptwofold.kernels.augment import crop_flip_to_float
from nptwofold.model import ResNet20
from nptwofold.optim import SGD
from nptwofold.steps import train_step
from nptwofold.twofold import Twofold, TwofoldConfig
rng = np.random.default_rng(7)
data = load_sample()
model = ResNet20(rng)
method = Twofold(model, TwofoldConfig(sparsity=0.5), seed=0) if sys.argv[2] == "twofold" else None
optimizer = SGD(model, momentum=0.9, weight_decay=5e-4, nesterov=True,
                no_decay=method.bit_parameter_names() if method else ())
losses = []
for step in range(5):
    index = rng.integers(0, len(data.train_labels), 20)
    offsets = rng.integers(0, 9, size=(2, 20))
    images = crop_flip_to_float(data.train_images[index], offsets[0], offsets[1],
                                rng.random(20) < 0.5)
    losses.append(float(train_step(model, optimizer, images, data.train_labels[index], 0.1,
                                   method=method)[0]))
digest = hashlib.sha256()
for name, value in model.state_arrays():
    digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
for name in sorted(optimizer.velocity):
    digest.update(optimizer.velocity[name].tobytes())
print(json.dumps({"losses": losses, "digest": digest.hexdigest()}))
"""


def train_five_steps(threads, method):
    result = subprocess.run([sys.executable, "-c", TRAIN_FIVE_STEPS, str(threads), method],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", ["plain", "twofold"])
def test_training_is_bit_identical_at_1_2_and_4_threads(method):
    runs = {threads: train_five_steps(threads, method) for threads in (1, 2, 4)}
    assert all(np.isfinite(runs[1]["losses"]))
    for threads in (2, 4):
        assert runs[threads]["losses"] == runs[1]["losses"], threads
        assert runs[threads]["digest"] == runs[1]["digest"], threads


@pytest.mark.parametrize("n_images", [1, CHUNK_IMAGES, CHUNK_IMAGES + 1, 5 * CHUNK_IMAGES - 3])
def test_image_chunks_cover_the_batch_in_order(n_images):
    chunks = image_chunks(n_images)
    assert chunks[0][0] == 0 and chunks[-1][1] == n_images
    for (start, stop), (next_start, _) in zip(chunks, chunks[1:]):
        assert stop - start == CHUNK_IMAGES and next_start == stop
    assert 0 < chunks[-1][1] - chunks[-1][0] <= CHUNK_IMAGES


@pytest.mark.parametrize("threads", ["1", "3"])
def test_run_parallel_calls_each_index_once_and_reraises(threads, monkeypatch):
    monkeypatch.setenv("NPTWOFOLD_THREADS", threads)
    calls = []
    run_parallel(calls.append, 37)
    assert sorted(calls) == list(range(37))

    def fail(index):
        if index == 3:
            raise ValueError("chunk 3")

    with pytest.raises(ValueError, match="chunk 3"):
        run_parallel(fail, 5)


def test_scratch_reuses_and_grows_its_buffer():
    small = scratch("test", (2, 3), np.float32)
    assert small.shape == (2, 3) and small.dtype == np.float32
    again = scratch("test", (3, 2), np.float32)
    assert np.shares_memory(small, again)
    bigger = scratch("test", (4, 5), np.float64)
    assert bigger.shape == (4, 5) and bigger.dtype == np.float64


def test_run_parallel_inside_a_pool_task_runs_in_order_on_that_thread(monkeypatch):
    monkeypatch.setenv("NPTWOFOLD_THREADS", "2")
    calls = []

    def outer(index):
        inner = []
        run_parallel(inner.append, 4)  # would wait on the pool's only helper if it used it
        calls.append((index, inner))

    # a deadlock would hang the test run; a daemon thread turns it into a failure
    caller = threading.Thread(target=run_parallel, args=(outer, 6), daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "a run_parallel call inside a pool task waited on the pool"
    assert sorted(index for index, _ in calls) == list(range(6))
    assert all(inner == [0, 1, 2, 3] for _, inner in calls)


PREDICT = """
import hashlib, sys
from nptwofold.threads import configure_threads
configure_threads(int(sys.argv[1]))
import numpy as np
from nptwofold.data import load_sample
from nptwofold.kernels.augment import to_float
from nptwofold.model import ResNet20
from nptwofold.steps import predict
rng = np.random.default_rng(3)
images = load_sample().test_images[:37]
model = ResNet20(rng)
for _, module in model.named_modules():  # BN statistics away from the identity
    if "running_var" in module.buffers:
        module.buffers["running_mean"][...] = rng.normal(0, 0.1, module.buffers["running_mean"].shape)
        module.buffers["running_var"][...] = rng.uniform(0.5, 2, module.buffers["running_var"].shape)
logits = predict(model, images)
whole = model.eval().forward(to_float(images))
print(np.abs(logits - whole).max() / np.abs(whole).max(), hashlib.sha256(logits.tobytes()).hexdigest())
"""


def test_predict_matches_the_batch_forward_at_any_thread_count():
    outputs = {}
    for threads in (1, 3):
        result = subprocess.run([sys.executable, "-c", PREDICT, str(threads)], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        error, outputs[threads] = result.stdout.split()
        assert float(error) < 1e-6, threads
    assert outputs[3] == outputs[1]


def test_inference_with_folded_batch_norm_matches_the_layer_by_layer_forward():
    from nptwofold.data import load_sample
    from nptwofold.kernels.augment import to_float
    from nptwofold.model import ResNet20
    rng = np.random.default_rng(4)
    model = ResNet20(rng, dtype=np.float64).eval()
    for _, module in model.named_modules():
        if "running_var" in module.buffers:
            for name in ("weight", "bias", "running_mean"):
                values = {**module.params, **module.buffers}[name]
                values[...] = rng.normal(values, 0.2)
            module.buffers["running_var"][...] = rng.uniform(0.5, 2, module.buffers["running_var"].shape)
    x = to_float(load_sample().test_images[:9]).astype(np.float64)
    folded = model.forward(x)
    convs = [module for _, module in model.named_modules() if hasattr(module, "folded_forward")]
    for conv in convs:  # a forward hook owns the conv: conv, BN and ReLU run one by one
        conv.use_forward_op(lambda layer, inputs: layer.own_forward(inputs))
    layer_by_layer = model.forward(x)
    np.testing.assert_allclose(folded, layer_by_layer, rtol=1e-10, atol=1e-10)


def test_predict_folds_once_per_call_and_sees_weights_changed_between_calls():
    from nptwofold.data import load_sample
    from nptwofold.kernels.augment import to_float
    from nptwofold.model import ResNet20
    from nptwofold.steps import predict
    model = ResNet20(np.random.default_rng(5))
    images = load_sample().test_images[:20]
    predict(model, images)
    assert all(module.derived is None for _, module in model.named_modules())
    getattr(model.layer2, "0").conv1.params["weight"] *= -2.0  # in place, as SGD does
    changed = predict(model, images)  # folds the changed weight, not the first call's
    np.testing.assert_allclose(changed, model.forward(to_float(images)), rtol=1e-5, atol=1e-5)
