"""Throughput benchmark: ResNet-20 training steps and inference, in images per second.

Times full training steps (augment, forward, backward, SGD update) and inference batches
after a warm-up, on real CIFAR-10 images from the embedded sample; also the Twofold training
step (bit-plane weights, both regularizers, bit clamping) and its cost relative to a plain
one: the median ratio of a Twofold step to the plain step timed just before it, over
alternated pairs (two blocks of steps timed one after the other differed by up to 30 % on a
noisy machine, either way). The first step of the process is reported separately as the cold
start (JIT compile, or loading Numba's cache); peak_rss_mb is the peak after the plain model's training, before the
Twofold model is built. `--json` prints one object for scripts that compare runs.
"""
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)


def timed(function, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = ScriptParser(__doc__)
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the engine's pool (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch, --threads and --steps must be >= 1, --warmup >= 0")
    configure_threads(args.threads)
    started = time.perf_counter()
    import numpy as np

    from nptwofold.data import load_sample
    from nptwofold.kernels.augment import crop_flip_to_float
    from nptwofold.model import ResNet20
    from nptwofold.optim import SGD
    from nptwofold.steps import evaluate, train_step
    from nptwofold.twofold import Twofold, TwofoldConfig

    data = load_sample()
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(data.train_labels), args.batch)
    images, labels = data.train_images[index], data.train_labels[index]

    def make_step(net, method):
        optimizer = SGD(net, momentum=0.9, weight_decay=5e-4, nesterov=True,
                        no_decay=method.bit_parameter_names() if method else ())

        def step():
            offsets = rng.integers(0, 9, size=(2, args.batch))
            inputs = crop_flip_to_float(images, offsets[0], offsets[1],
                                        rng.random(args.batch) < 0.5)
            train_step(net, optimizer, inputs, labels, lr=0.01, method=method)
        return step

    def seconds_per_step(step):
        for _ in range(args.warmup):
            step()
        return timed(step, args.steps)

    model = ResNet20(rng)
    plain_step = make_step(model, None)
    import_seconds = time.perf_counter() - started
    cold_start = timed(plain_step, 1)
    train_seconds = seconds_per_step(plain_step)
    # read before the second model exists: the peak of one model's training
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    evaluate(model, images, labels, args.batch)  # warm the inference path
    infer_seconds = timed(lambda: evaluate(model, images, labels, args.batch), args.steps)
    twofold_model = ResNet20(rng)
    twofold_step = make_step(twofold_model,
                             Twofold(twofold_model, TwofoldConfig(sparsity=0.5), seed=0))
    for _ in range(args.warmup):
        twofold_step()
    pairs = np.array([(timed(plain_step, 1), timed(twofold_step, 1)) for _ in range(args.steps)])
    twofold_seconds = float(np.median(pairs[:, 1]))
    result = dict(
        train_img_s=round(args.batch / train_seconds, 1),
        infer_img_s=round(args.batch / infer_seconds, 1),
        train_step_ms=round(1000 * train_seconds, 1),
        twofold_train_img_s=round(args.batch / twofold_seconds, 1),
        twofold_step_ratio=round(float(np.median(pairs[:, 1] / pairs[:, 0])), 3),
        batch=args.batch, threads=args.threads,
        cold_start_s=round(cold_start, 2), import_s=round(import_seconds, 2),
        peak_rss_mb=round(peak_rss_mb, 1),
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
