"""ADC-aware fine-tuning of a float checkpoint (`nptwofold.adc_finetune`): every conv and the FC
run on the simulated array with a finite ADC in the forward, with the float layer's gradient
(straight-through), so the model adapts to that ADC width and encoding.

    python scripts/adc_finetune.py CKPT --adc-bits 4 --weight-encoding sign_magnitude --epochs 1
        --out DIR [--lr 0.002] [--train-images N] [--calib-images 500] [--batch-size 128]
        [--data PATH|sample|cifar10] [--seed 0] [--threads 2]

The array is CKPT's stored one, changed by the flags (the ADC must be finite). Writes
DIR/last.h5 (a normal checkpoint: the model, its config with the array it was adapted to and an
"adc_finetune" entry), DIR/last.h5.cim.h5 (the calibration the ADC ranges came from, so
scripts/cim_eval.py evaluates the model with them) and DIR/log.json (settings, loss and
accuracy of every step). The clips and ADC ranges are calibrated on CKPT's weights first
(cached in CKPT's calibration file when its folder is writable, as cim_eval does).
"""
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import MAX_BATCH_SIZE, ScriptParser, threads_flag  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)


def parse_args(argv):
    from nptwofold.cim.tools import add_cim_flags

    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="float checkpoint to adapt")
    parser.add_argument("--out", required=True, help="output folder (must not hold last.h5)")
    add_cim_flags(parser, skip=("images",))
    parser.add_argument("--epochs", type=int, default=1, help="fine-tune epochs")
    parser.add_argument("--lr", type=float, default=0.002, help="constant SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--train-images", type=int,
                        help="first N training images (default: all 50,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and augmentation")
    parser.add_argument("--threads", type=int, default=2, help="threads of the CIM kernels")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "train_images", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > MAX_BATCH_SIZE:
        parser.error(f"--batch-size must be <= {MAX_BATCH_SIZE} (got {args.batch_size})")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0 (got {args.lr})")
    return args


def run(args):
    from nptwofold.cim.finetune import finetune
    from nptwofold.checkpoint import save_checkpoint
    from nptwofold.cim.calibration import default_path
    from nptwofold.cim.tools import (calibration_cache, dataset_of, hardware_line,
                                     open_checkpoint, options_of)
    from nptwofold.cim.network import CimNetwork
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import RunLock, check_output_dir, write_json

    out = Path(args.out).absolute()
    check_output_dir(out)  # before the fine-tuning, which a late failure would lose
    RunLock(out).acquire()  # held to the end of the process
    if (out / "last.h5").exists():
        raise NptwofoldError(f"{out / 'last.h5'} exists; choose another --out")
    options = options_of(args)
    model, method, content, hardware, notes = open_checkpoint(args.checkpoint, args)
    if method is not None:
        raise NptwofoldError("ADC-aware fine-tuning takes a float checkpoint; "
                             f"{args.checkpoint} is a twofold model")
    if not hardware.adc_bits:
        raise NptwofoldError("ADC-aware fine-tuning needs a finite ADC; the checkpoint's is "
                             "ideal: give --adc-bits N")
    print(hardware_line(hardware, notes))
    network = CimNetwork(model, None, hardware)
    dataset = dataset_of(options, content)
    cache = calibration_cache(args.checkpoint, options, dataset, content=content)
    cache.prepare(network)
    cache.save(network)

    settings = {key: value for key, value in vars(args).items() if key not in ("out", "threads")}
    steps = []
    started = time.perf_counter()

    def on_step(epoch, step, loss, correct, n):
        steps.append(dict(epoch=epoch + 1, step=step + 1, loss=float(loss),
                          accuracy=correct / n, seconds=time.perf_counter() - started))
        print(f"epoch {epoch + 1} step {step + 1}: loss {loss:.4f}, batch accuracy "
              f"{correct / n:.3f}", flush=True)

    images = dataset.train_images[:args.train_images]
    labels = dataset.train_labels[:args.train_images]
    finetune(network, images, labels, args.epochs, args.lr, args.batch_size, seed=args.seed,
             on_step=on_step)
    config = dict(content["config"], hardware=dataclasses.asdict(hardware),
                  adc_finetune=dict(settings, train_images_used=len(images)))
    save_checkpoint(out / "last.h5", network.model, config=config)
    cache.pin(network, default_path(out / "last.h5"))
    write_json(out / "log.json", dict(settings=settings, steps=steps))
    print(f"wrote {out / 'last.h5'} after {time.perf_counter() - started:.0f} s")


def main(argv=None):
    threads = threads_flag(argv)
    configure_threads(threads, numba_threads=threads)
    args = parse_args(argv)
    from nptwofold.errors import NptwofoldError

    try:
        run(args)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main, "interrupted: nothing saved (the fine-tuning writes its checkpoint "
               "when it ends)")
