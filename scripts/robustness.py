"""Accuracy on the simulated array against device non-idealities: for each checkpoint and
weight encoding, the CIM accuracy against the device-to-device conductance spread (lognormal
sigma, every state) and against the stuck-at rate (half the stuck cells at 00, half at 11),
each over several simulated chips (docs/cim-model.md, "Device model").

    python scripts/robustness.py CKPT [CKPT ...] [--weight-encoding E [E ...]]
        [--sigmas 0 0.025 0.05 0.1 0.2] [--stuck-rates 0 0.001 0.005 0.01 0.02]
        [--chips 5] [--images 2000] [--chip-seed S] [--adc-bits N]
        [--encoding-adc E=N ...] [--hw KEY=VALUE ...]
        [--data PATH] [--calib-images N] [--out DIR] [--threads N]

The array is each checkpoint's stored one, changed by the flags (the ADC, and device settings
such as read_noise or cell_conductance, which then apply at every point). `--encoding-adc`
puts each encoding on its own chip, e.g. `twos_complement=8 sign_magnitude=5`: the ADC width
each needs. Chip i of every point is drawn from the seed (S, i); the nominal point (sigma 0,
stuck-at rate 0) is run once, since every chip of the ideal device is the same. Each
checkpoint's calibration file (CKPT.cim.h5) is read or written as by cim_eval.py. Writes
DIR/robustness.csv, DIR/robustness.json (after every point) and, with matplotlib,
DIR/robustness.png: the mean accuracy with its standard deviation
over the chips as error bars, against each knob and against the expected weight error. That
error (`cim.variation.relative_weight_error`) is the RMS error of the weights a chip reads
over their RMS, computed from the cells' states and the device model (read noise and the ADC
aside): it says how far each point's chips are from the network's weights before any image.

A study resumes and grows: a point already in DIR/robustness.json with the same settings (the
model's weights, the array, the images and the chips, by digest) is not run again, and the
rows of other checkpoints stay, so a stopped study continues where it stopped and a second
command adds its models to the same table and plot.
"""
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser, threads_flag  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

SWEPT = ("weight_encoding",)


def parse_args(argv):
    from nptwofold.cim.tools import add_cim_flags
    from nptwofold.kernels.quant import ENCODINGS

    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="nptwofold checkpoints")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.025, 0.05, 0.1, 0.2],
                        help="lognormal sigmas of the conductance spread")
    parser.add_argument("--stuck-rates", type=float, nargs="+",
                        default=[0, 0.001, 0.005, 0.01, 0.02],
                        help="shares of stuck cells, half at 00 and half at 11")
    parser.add_argument("--chips", type=int, default=5, help="simulated chips per point")
    parser.add_argument("--chip-seed", type=int, default=0, metavar="S",
                        help="chip i is drawn from (S, i) (default 0)")
    parser.add_argument("--images", type=int, default=2000, help="first N test images")
    array = add_cim_flags(parser, hardware_skip=SWEPT, skip=("images", "calibration"))
    array.add_argument("--weight-encoding", nargs="+", choices=ENCODINGS,
                       help="weight encodings to run (default: each checkpoint's)")
    array.add_argument("--encoding-adc", nargs="+", default=[], metavar="E=N",
                       help="ADC width per weight encoding, over --adc-bits (default: none)")
    parser.add_argument("--out", default="results/robustness", help="output folder")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the CIM kernels (results do not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("chips", "images", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.chip_seed < 0:
        parser.error("--chip-seed must be >= 0")
    args.encoding_adc = encoding_adc(parser, args.encoding_adc, ENCODINGS)
    return args


def encoding_adc(parser, pairs, encodings):
    """{encoding: ADC bits} of the --encoding-adc pairs."""
    from nptwofold.cim.adc import check_adc_bits
    from nptwofold.errors import NptwofoldError

    widths = {}
    for pair in pairs:
        encoding, _, bits = pair.partition("=")
        if encoding not in encodings or not bits.isdigit():
            parser.error(f"--encoding-adc takes ENCODING=BITS with ENCODING one of "
                         f"{', '.join(encodings)}, got {pair!r}")
        try:
            widths[encoding] = check_adc_bits(int(bits))
        except NptwofoldError as exc:
            parser.error(f"--encoding-adc {pair}: {exc}")
    return widths


def device_points(hardware, sigmas, stuck_rates):
    """[(knob, value, HardwareConfig)] of every point; a bad value raises (NptwofoldError)
    here, before any work."""
    points = [("sigma", sigma, dataclasses.replace(hardware, conductance_sigma=[sigma]))
              for sigma in sigmas]
    points += [("stuck", rate, dataclasses.replace(hardware, stuck_low_rate=rate / 2,
                                                   stuck_high_rate=rate / 2))
               for rate in stuck_rates]
    return points


def accuracy_on_chips(network, images, labels, chips, seed, batch_size, bar):
    """[(accuracy, seconds)] of `network` on each of `chips` chips."""
    import numpy as np

    results = []
    for chip in range(chips):
        network.draw_chip((seed, chip))
        started = time.perf_counter()
        predictions = []
        for start in range(0, len(images), batch_size):
            predictions.append(network.cim_logits(images[start:start + batch_size]).argmax(1))
            bar.update(min(batch_size, len(images) - start))
        results.append((float(np.mean(np.concatenate(predictions) == labels)),
                        time.perf_counter() - started))
    return results


def settings_digest(weights, images, calibration_images, hardware, chips, chip_seed):
    """What a point's accuracy depends on, as one SHA-256 (the digests of the model's arrays
    and of the images, the array with its device, the chips)."""
    settings = dict(weights=weights, images=images, calibration_images=calibration_images,
                    hardware=dataclasses.asdict(hardware), chips=chips, chip_seed=chip_seed)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


ROW_KEYS = ("checkpoint", "encoding", "adc_bits", "knob", "value", "chips", "images",
            "accuracy_mean", "accuracy_sd", "accuracy_worst", "seconds_per_chip", "settings")


def read_rows(path):
    """The rows of an earlier study in `path`, [] if there is none."""
    from nptwofold.errors import NptwofoldError

    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(
                isinstance(row, dict) and set(ROW_KEYS) <= set(row) for row in rows):
            raise ValueError
    except ValueError:
        raise NptwofoldError(f"{path} is not a robustness study of this script (or is "
                             "corrupt); choose another --out") from None
    return rows


def study(args, rows, record):
    """Runs every point not in `rows` (an earlier study's, extended in place); `record()` is
    called after each new point."""
    import numpy as np
    from tqdm import tqdm

    from nptwofold.cim.calibration import images_digest, weights_digest
    from nptwofold.cim.network import CimNetwork
    from nptwofold.cim.tools import calibration_cache, dataset_of, open_checkpoint, options_of
    from nptwofold.cim.variation import relative_weight_error
    from nptwofold.errors import NptwofoldError

    def series_point(row):
        return row["checkpoint"], row["encoding"], row["adc_bits"], row["knob"], row["value"]

    options = options_of(args)
    for path in args.checkpoints:
        model, method, content, hardware, notes = open_checkpoint(path, args, SWEPT)
        encodings = args.weight_encoding or [hardware.weight_encoding]
        variants = [dataclasses.replace(hardware, weight_encoding=e,
                                        adc_bits=args.encoding_adc.get(e, hardware.adc_bits))
                    for e in encodings]
        points = [device_points(variant, args.sigmas, args.stuck_rates) for variant in variants]
        dataset = dataset_of(options, content)
        images, labels = (dataset.test_images[:args.images], dataset.test_labels[:args.images])
        network = CimNetwork(model, method, variants[0])
        cache = calibration_cache(path, options, dataset, log=tqdm.write, content=content)
        cache.prepare(network)
        networks = []
        for variant in variants:  # each encoding's ADC ranges, counted once and cached
            networks.append(network.with_hardware(variant))
            cache.ensure_adc(networks[-1])
            network.adc_histograms = {**networks[-1].adc_histograms, **network.adc_histograms}
        cache.save(network)
        digests = (weights_digest(network), images_digest(images), images_digest(cache.images))
        for variant_network, variant_points in zip(networks, points):
            encoding = variant_network.hardware.weight_encoding
            crossbars = [layer.crossbar for layer in variant_network.layers.values()]
            nominal = None
            for knob, value, device in variant_points:
                chips = 1 if value == 0 else args.chips
                settings = settings_digest(*digests, device, chips, args.chip_seed)
                weight_error = relative_weight_error(crossbars, device)
                point = (str(path), encoding, device.adc_bits, knob, value)
                earlier = [row for row in rows if series_point(row) == point]
                if earlier and earlier[0]["settings"] == settings:
                    if "weight_error" not in earlier[0]:  # a row of a study before it was kept
                        earlier[0]["weight_error"] = weight_error
                        record()
                    tqdm.write(format_row(earlier[0]) + "  (earlier run)")
                    nominal = earlier[0] if value == 0 else nominal
                    continue
                if earlier:
                    raise NptwofoldError(
                        f"the study in --out ran {Path(path).name}, {encoding}, {knob} "
                        f"{value:g} with other settings (weights, images, array or chips); "
                        "choose another --out")
                if value == 0 and nominal is not None:  # the nominal array, already run
                    rows.append({**nominal, "knob": knob, "settings": settings})
                    tqdm.write(format_row(rows[-1]))
                    record()
                    continue
                with tqdm(total=len(images) * chips, unit="img", leave=False,
                          desc=f"{Path(path).name} {encoding} {knob} {value:g}",
                          disable=args.no_progress) as bar:
                    results = accuracy_on_chips(variant_network.with_hardware(device), images,
                                                labels, chips, args.chip_seed,
                                                options.eval_batch_size, bar)
                accuracies = [accuracy for accuracy, _ in results]
                row = dict(checkpoint=str(path), encoding=encoding,
                           adc_bits=variant_network.hardware.adc_bits, knob=knob, value=value,
                           chips=len(results), images=len(images),
                           accuracy_mean=float(np.mean(accuracies)),
                           accuracy_sd=float(np.std(accuracies, ddof=1))
                           if len(results) > 1 else 0.0,
                           accuracy_worst=min(accuracies),
                           seconds_per_chip=float(np.mean([s for _, s in results])),
                           weight_error=weight_error, settings=settings)
                rows.append(row)
                record()
                if value == 0:
                    nominal = row
                tqdm.write(format_row(row))


def format_row(row):
    return (f"{Path(row['checkpoint']).name:<24}{row['encoding']:<17}{row['adc_bits']:>4}  "
            f"{row['knob']:<7}"
            f"{row['value']:>7.3f}{row['chips']:>6}{row['accuracy_mean']:>9.4f}"
            f"{row['accuracy_sd']:>8.4f}{row['accuracy_worst']:>8.4f}"
            f"{row['weight_error']:>8.3f}{row['seconds_per_chip']:>9.1f}")


HEADER = (f"{'checkpoint':<24}{'encoding':<17}{'adc':>4}  {'knob':<7}{'value':>7}{'chips':>6}"
          f"{'accuracy':>9}{'sd':>8}{'worst':>8}{'w.error':>8}{'s/chip':>9}")


def plot(rows, path):
    """Mean accuracy (error bars: sd over chips) against sigma, against the stuck-at rate and
    against the expected weight error of both, one line per checkpoint and encoding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from nptwofold.files import atomic_write

    figure, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for key in dict.fromkeys((row["checkpoint"], row["encoding"], row["adc_bits"])
                             for row in rows):
        label = (f"{Path(key[0]).name}, {key[1]}, "
                 f"{f'{key[2]}-bit ADC' if key[2] else 'ideal ADC'}")
        for axis, knob in zip(axes, ("sigma", "stuck")):
            series = [row for row in rows if (row["checkpoint"], row["encoding"],
                                              row["adc_bits"]) == key and row["knob"] == knob]
            line = axis.errorbar([100 * row["value"] for row in series],
                                 [100 * row["accuracy_mean"] for row in series],
                                 [100 * row["accuracy_sd"] for row in series], marker="o",
                                 capsize=3, label=label)[0]
            errored = [row for row in series if row["value"] > 0]
            axes[2].plot([100 * row["weight_error"] for row in errored],
                         [100 * row["accuracy_mean"] for row in errored],
                         "o" if knob == "sigma" else "x", color=line.get_color())
    for axis, xlabel in zip(axes, ("conductance spread, lognormal sigma (%)", "stuck-at cells (%)",
                                   "expected RMS weight error / RMS weight (%); o spread, "
                                   "x stuck")):
        axis.set(xlabel=xlabel, ylabel="test accuracy (%)")
    axes[2].set_xscale("log")
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    # labels on every minor tick overlap once the errors span two decades
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def main(argv=None):
    threads = threads_flag(argv)
    configure_threads(threads, numba_threads=threads)
    args = parse_args(argv)

    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_file, write_csv, write_json

    out = Path(args.out)
    paths = {kind: out / f"robustness.{kind}" for kind in ("csv", "json", "png")}
    try:
        for path in paths.values():
            check_output_file(path)
        rows = read_rows(paths["json"])

        def record():  # after every point, so a stopped study keeps what it ran
            write_csv(paths["csv"], rows)
            write_json(paths["json"], rows)

        print(HEADER)
        study(args, rows, record)
        record()
        print(f"wrote {paths['csv'].absolute()} and {paths['json'].absolute()}")
        try:
            plot(rows, paths["png"])
            print(f"wrote {paths['png'].absolute()}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install -e '.[plot]')")
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    except OSError as error:
        sys.exit(f"error: cannot write to {out}: {error.strerror or error}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main, "interrupted: the points measured so far are in robustness.json under "
               "--out; the same command continues the study")
