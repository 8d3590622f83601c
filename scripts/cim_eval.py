"""Run a checkpoint on the simulated CIM array: test accuracy of the float, fake-quant and CIM
runs, for a list of ADC widths and weight encodings in one go, and energy per image (cells / ADC
/ LFSR, cell-state histogram) with its ratio to a dense baseline (`nptwofold.cim_network`): by
default the same weights on every row, with `--baseline CKPT` a separately trained dense model
run on the same images (its energy counted from its own activations).

    python scripts/cim_eval.py CKPT [--baseline CKPT] [--data PATH|sample] [--images N]
        [--adc-bits N [N ...]] [--encoding E [E ...]] [--adc-range fixed|calibrated]
        [--hw-config JSON] [--hw KEY=VALUE ...] [--calib-images N] [--json OUT] [--csv OUT]
        [--plot OUT.png] [--threads N]

The activation clips and the ADC partial-sum histograms are calibrated on training images and
cached in the checkpoint (/cim) when it is writable; a read-only checkpoint is evaluated all the
same and the report says the calibration was not cached.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import MAX_EVAL_BATCH_SIZE, ScriptParser  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

NANOJOULE = 1e3  # pJ per nJ: the tables print nJ, the files keep pJ
ENCODINGS = ("twos_complement", "offset_binary", "sign_magnitude")


def parse_args(argv):
    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="an nptwofold checkpoint (Twofold or float)")
    parser.add_argument("--baseline", metavar="CKPT",
                        help="dense 8-bit baseline checkpoint to compare the energy with "
                        "(default: this checkpoint's weights mapped dense)")
    parser.add_argument("--data", help="CIFAR-10 tarball or folder, 'sample' or 'cifar10' "
                        "(default: the data the checkpoint was trained on)")
    parser.add_argument("--images", type=int, help="first N test images (default: all)")
    parser.add_argument("--adc-bits", type=int, nargs="+", metavar="N",
                        help="ADC widths to run, 0 = ideal (default: 0, or the --hw-config "
                        "file's adc_bits)")
    parser.add_argument("--encoding", nargs="+", choices=ENCODINGS,
                        help="weight encodings to run (default: twos_complement, or the "
                        "--hw-config file's weight_encoding)")
    parser.add_argument("--adc-range", choices=("fixed", "calibrated"),
                        help="ADC full scale (default: calibrated, or the --hw-config file's "
                        "adc_range)")
    parser.add_argument("--hw-config", help="HardwareConfig JSON file (default: none, the values in "
                        "docs/cim-model.md)")
    parser.add_argument("--hw", action="append", default=[], metavar="KEY=VALUE",
                        help="override one HardwareConfig field, the value in JSON; repeatable "
                        "(--hw crossbar_rows=256 --hw 'cell_energy_pj=[0.08,0.36,0.73,1.49]')")
    parser.add_argument("--calib-images", type=int, default=500,
                        help="training images that calibrate the activation clips and ADC "
                        "ranges; cached in the checkpoint (/cim) if it is writable")
    parser.add_argument("--recalibrate", action="store_true",
                        help="calibrate again even if the checkpoint holds a calibration")
    parser.add_argument("--weight-bits", type=int,
                        help="bits of a float checkpoint's weights (default 8)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per simulated batch")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the CIM kernels (default 2; results do not depend on it)")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--csv", metavar="OUT", help="write the per-layer rows of every run")
    parser.add_argument("--plot", metavar="OUT", help="plot accuracy and energy against the "
                        "ADC width (needs matplotlib, the optional extra 'plot')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("images", "calib_images", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > MAX_EVAL_BATCH_SIZE:
        parser.error(f"--batch-size must be <= {MAX_EVAL_BATCH_SIZE} (got {args.batch_size})")
    return args


def hardware_overrides(pairs):
    """{key: value} of the --hw KEY=VALUE flags, values parsed as JSON."""
    from nptwofold.errors import NptwofoldError

    overrides = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator:
            raise NptwofoldError(f"--hw takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(text)
        except ValueError:
            raise NptwofoldError(f"--hw {key}: {text!r} is not a JSON value") from None
    return overrides


def hardware_variants(args):
    """The HardwareConfig of every (encoding, ADC width) run, encodings outermost."""
    from nptwofold.hardware import HardwareConfig

    settings = HardwareConfig.from_json(args.hw_config).to_dict() if args.hw_config else {}
    settings.update(hardware_overrides(args.hw))
    if args.adc_range:
        settings["adc_range"] = args.adc_range
    base = HardwareConfig.from_json(settings)  # validates keys and values
    encodings = args.encoding or [base.weight_encoding]
    widths = args.adc_bits if args.adc_bits is not None else [base.adc_bits]
    return base, [HardwareConfig.from_json(dict(settings, weight_encoding=encoding,
                                                adc_bits=bits))
                  for encoding in encodings for bits in widths]


def calibration_note(calibrated, stored):
    if not calibrated:
        return "stored in the checkpoint by an earlier calibration"
    if stored:
        return "calibrated now, stored in the checkpoint"
    return "calibrated now, not cached: the checkpoint is not writable"


def run_batches(images, batch_size, logits_of, bar):
    """Predicted classes of `images`, batch by batch; returns (predictions, seconds)."""
    import numpy as np

    started = time.perf_counter()
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        predictions.append(logits_of(batch).argmax(axis=1))
        bar.update(len(batch))
    return np.concatenate(predictions), time.perf_counter() - started


def evaluate_on_array(args):
    import numpy as np
    from tqdm import tqdm

    from nptwofold.cim_network import CimNetwork
    from nptwofold.data import load_dataset

    base_hardware, variants = hardware_variants(args)
    network, content = CimNetwork.from_checkpoint(args.checkpoint, variants[0],
                                                  args.weight_bits)
    dataset = load_dataset(args.data or content["config"].get("data", "cifar10"))
    images = dataset.test_images[:args.images]
    labels = dataset.test_labels[:args.images]
    calibration = dataset.train_images[:args.calib_images]

    started = time.perf_counter()
    notes = [calibration_note(*network.calibrate_checkpoint(
        args.checkpoint, content, calibration, args.batch_size, args.recalibrate))]
    networks = [network.with_hardware(hardware) for hardware in variants]
    for variant in networks:
        found = variant.ensure_adc_calibration(args.checkpoint, calibration, args.batch_size)
        if found[0]:
            notes.append(f"{variant.hardware.weight_encoding} ADC ranges "
                         + calibration_note(*found))
            for other in networks:  # the same encoding's other widths share the histograms
                other.adc_histograms = {**variant.adc_histograms, **other.adc_histograms}
                other.select_adc_histograms()
    seconds = dict(calibration=time.perf_counter() - started)

    total = len(images) * (2 + len(networks))
    with tqdm(total=total, unit="img", desc="cim eval", disable=args.no_progress) as bar:
        float_predictions, seconds["float"] = run_batches(images, args.batch_size,
                                                          network.float_logits, bar)
        fake_predictions, seconds["fake_quant"] = run_batches(images, args.batch_size,
                                                              network.fake_quant_logits, bar)
        runs = []
        for variant in networks:
            predictions, elapsed = run_batches(images, args.batch_size, variant.cim_logits, bar)
            runs.append((variant, predictions, elapsed))

    baseline = None
    if args.baseline:
        baseline = baseline_energy(args.baseline, base_hardware, dataset, images, args)
    results = []
    for variant, predictions, elapsed in runs:
        energy = variant.energy_report(baseline)
        hardware = variant.hardware
        results.append(dict(
            encoding=hardware.weight_encoding, adc_bits=hardware.adc_bits,
            adc_range=hardware.adc_range, hardware=hardware.to_dict(),
            accuracy=float(np.mean(predictions == labels)),
            fake_quant_agreement=float(np.mean(predictions == fake_predictions)),
            seconds=elapsed,
            layers=[{**summary, **row} for summary, row in zip(variant.layer_summary(),
                                                               energy["layers"])],
            total=energy["total"]))
    return dict(
        checkpoint=str(args.checkpoint), data=dataset.source, n_images=len(images),
        baseline=(f"{args.baseline}, counted on the same images" if args.baseline else
                  "the same weights on every row, same encoding, no LFSR"),
        calibration_images=len(calibration), calibration="; ".join(notes),
        accuracy=dict(float=float(np.mean(float_predictions == labels)),
                      fake_quant=float(np.mean(fake_predictions == labels))),
        seconds=seconds, runs=results)


def baseline_energy(path, hardware, dataset, images, args):
    """energy_report of the baseline checkpoint on `images`, by counting (ideal-ADC run)."""
    from nptwofold.cim_network import CimNetwork

    network, content = CimNetwork.from_checkpoint(path, hardware)
    network.calibrate_checkpoint(path, content, dataset.train_images[:args.calib_images],
                                 args.batch_size, args.recalibrate)
    network.count_energy(images, args.batch_size)
    return network.energy_report()


def adc_label(run):
    if not run["adc_bits"]:
        return "ideal"
    return f"{run['adc_bits']}-bit {run['adc_range']}"


def format_table(result):
    """The readable report: accuracies and energies of every run, then the first run's
    per-layer energies in nJ."""
    accuracy = result["accuracy"]
    hardware = result["runs"][0]["hardware"]
    lines = [
        f"{result['checkpoint']}: {result['n_images']} test images from {result['data']}; "
        f"{hardware['activation_bits']}-bit inputs, {hardware['crossbar_rows']}x"
        f"{hardware['crossbar_cols']} crossbars; calibration ({result['calibration_images']} "
        f"images): {result['calibration']}",
        f"accuracy: float {accuracy['float']:.4f}, fake-quant (ideal ADC) "
        f"{accuracy['fake_quant']:.4f}",
        f"energy per image, nJ (dense: {result['baseline']}; ratio = dense / this)",
        f"{'encoding':<17}{'ADC':<16}{'accuracy':>9}{'= fq':>7}{'cells':>9}{'ADC':>8}"
        f"{'LFSR':>7}{'total':>9}{'dense':>9}{'ratio':>7}{'seconds':>9}",
    ]
    for run in result["runs"]:
        total = run["total"]
        lines.append(
            f"{run['encoding']:<17}{adc_label(run):<16}{run['accuracy']:>9.4f}"
            f"{run['fake_quant_agreement']:>7.1%}{total['cells_pj'] / NANOJOULE:>9.1f}"
            f"{total['adc_pj'] / NANOJOULE:>8.1f}{total['lfsr_pj'] / NANOJOULE:>7.1f}"
            f"{total['total_pj'] / NANOJOULE:>9.1f}{total['baseline_total_pj'] / NANOJOULE:>9.1f}"
            f"{total['baseline_ratio']:>7.2f}{run['seconds']:>9.1f}")
    first = result["runs"][0]
    lines += [f"per layer, {first['encoding']}, {adc_label(first)} ADC:",
              f"{'layer':<16}{'kept/rows':>10}{'rows/tile':>10}{'xbars':>6}{'cells':>9}"
              f"{'ADC':>8}{'LFSR':>7}{'total':>9}{'c00':>6}{'c01':>6}{'c10':>6}{'c11':>6}"
              f"{'dense':>9}{'ratio':>7}"]
    for row in first["layers"] + [first["total"]]:
        shape = f"{row['kept']}/{row['rows']}" if "rows" in row else ""
        per_tile = f"{row['rows_per_tile_mean']:.0f}" if "rows" in row else ""
        lines.append(
            f"{row['layer']:<16}{shape:>10}{per_tile:>10}{row.get('crossbars', ''):>6}"
            f"{row['cells_pj'] / NANOJOULE:>9.1f}{row['adc_pj'] / NANOJOULE:>8.1f}"
            f"{row['lfsr_pj'] / NANOJOULE:>7.1f}{row['total_pj'] / NANOJOULE:>9.1f}"
            + "".join(f"{row['cells_' + s]:>6.2f}" for s in ("00", "01", "10", "11"))
            + f"{row['baseline_total_pj'] / NANOJOULE:>9.1f}{row['baseline_ratio']:>7.2f}")
    seconds = result["seconds"]
    lines.append(f"time: calibration {seconds['calibration']:.1f} s, float {seconds['float']:.1f}"
                 f" s, fake-quant {seconds['fake_quant']:.1f} s, CIM runs "
                 f"{sum(run['seconds'] for run in result['runs']):.1f} s")
    return "\n".join(lines)


def plot(result, path):
    """Accuracy and energy per image against the ADC width, one line per encoding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for encoding in dict.fromkeys(run["encoding"] for run in result["runs"]):
        runs = sorted((run for run in result["runs"] if run["encoding"] == encoding and
                       run["adc_bits"]), key=lambda run: run["adc_bits"])
        widths = [run["adc_bits"] for run in runs]
        left.plot(widths, [100 * run["accuracy"] for run in runs], "o-", label=encoding)
        right.plot(widths, [run["total"]["total_pj"] / NANOJOULE for run in runs], "o-",
                   label=encoding)
    left.axhline(100 * result["accuracy"]["fake_quant"], color="gray", ls="--",
                 label="ideal ADC")
    left.set(xlabel="ADC bits", ylabel="test accuracy (%)")
    right.set(xlabel="ADC bits", ylabel="energy per image (nJ)")
    left.legend()
    figure.tight_layout()
    from nptwofold.files import atomic_write
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def write_outputs(args, result):
    """Writes the requested files; a failure ends in one line naming the file."""
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import write_csv, write_json

    rows = [dict(encoding=run["encoding"], adc=adc_label(run), **row)
            for run in result["runs"] for row in run["layers"] + [run["total"]]]
    for path, write in ((args.json, lambda: write_json(args.json, result)),
                        (args.csv, lambda: write_csv(args.csv, rows))):
        if path:
            try:
                write()
            except OSError as error:
                raise NptwofoldError(f"cannot write {path}: {error.strerror or error}") from None
            print(f"wrote {Path(path).absolute()}")
    if args.plot:
        try:
            plot(result, args.plot)
            print(f"wrote {Path(args.plot).absolute()}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install -e '.[plot]')")
        except OSError as error:
            raise NptwofoldError(f"cannot write {args.plot}: {error.strerror or error}") from None


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads, numba_threads=args.threads)

    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_file

    try:
        for path in (args.json, args.csv, args.plot):
            check_output_file(path)
        result = evaluate_on_array(args)
        print(format_table(result))
        write_outputs(args, result)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
