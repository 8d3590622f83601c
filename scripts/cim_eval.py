"""Run a checkpoint on the simulated CIM array: test accuracy of the float, fake-quant and CIM
runs, for a list of ADC widths and weight encodings in one go, and energy per image (cells / ADC
/ LFSR, cell-state histogram) with its ratio to a dense baseline (`nptwofold.cim.network`): by
default the same weights on every row, with `--baseline CKPT` a separately trained dense model
run on the same images (its energy counted from its own activations).

    python scripts/cim_eval.py CKPT [--baseline CKPT] [--data PATH|sample|cifar10] [--images N]
        [--adc-bits N [N ...]] [--weight-encoding E [E ...]] [--adc-range fixed|calibrated]
        [--hw-config FILE] [--hw KEY=VALUE ...] [--calib-images N] [--calibration FILE]
        [--chips N] [--chip-seed S] [--json OUT] [--csv OUT] [--plot OUT.png] [--threads N]

The array is the one the checkpoint was trained for (its stored hardware config: encoding,
weight and activation bits, ADC, ...); a flag changes it, and the report says so. The
activation clips and ADC partial-sum histograms are calibrated on training images and cached in
a calibration file beside the checkpoint (CKPT.cim.h5, or --calibration FILE), never in the
checkpoint; a calibration computed from other weights, images or settings is redone.

With a device model that is not ideal (conductance spread, read noise, stuck-at cells: `--hw
conductance_sigma=[0.1]` etc., docs/cim-model.md), every CIM run is repeated on `--chips N`
simulated chips, chip i drawn from the seed (S, i); the table gives the mean accuracy over the
chips, and the lines below it the standard deviation, the worst chip and each pass's time. The
energy does not depend on the chip (it is the mean of the chips' runs).

In the table, "= fq" is the share of test images on which the CIM run predicts the same class
as the fake-quant run (quantized weights and inputs, exact integer matmul): 100 % means the ADC
changed no prediction.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser, threads_flag  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

NANOJOULE = 1e3  # pJ per nJ: the tables print nJ, the files keep pJ
SWEPT = ("adc_bits", "weight_encoding")  # the array flags that take a list here


def parse_args(argv):
    from nptwofold.cim.tools import add_cim_flags
    from nptwofold.kernels.quant import ENCODINGS

    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="an nptwofold checkpoint (Twofold or float)")
    parser.add_argument("--baseline", metavar="CKPT",
                        help="dense 8-bit baseline checkpoint to compare the energy with "
                        "(default: this checkpoint's weights mapped dense)")
    array = add_cim_flags(parser, hardware_skip=SWEPT)
    array.add_argument("--adc-bits", type=int, nargs="+", metavar="N",
                       help="ADC widths to run, 0 = ideal (default: the checkpoint's)")
    array.add_argument("--weight-encoding", nargs="+", choices=ENCODINGS,
                       help="weight encodings to run (default: the checkpoint's)")
    parser.add_argument("--chips", type=int, default=1, metavar="N",
                        help="simulated chips per CIM run, each drawn from the device model "
                        "(needs a device that varies; default 1)")
    parser.add_argument("--chip-seed", type=int, default=0, metavar="S",
                        help="seed of the chips: chip i is drawn from (S, i) (default 0)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the CIM kernels (default 2; results do not depend on it)")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--csv", metavar="OUT", help="write the per-layer rows of every run")
    parser.add_argument("--plot", metavar="OUT", help="plot accuracy and energy against the "
                        "ADC width (needs matplotlib, the optional extra 'plot')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.chips < 1:
        parser.error("--chips must be >= 1")
    if args.chip_seed < 0:
        parser.error("--chip-seed must be >= 0")
    return args


def hardware_variants(args, hardware):
    """The HardwareConfig of every (encoding, ADC width) run, encodings outermost, and the
    notes on the list flags that contradict the checkpoint's `hardware`."""
    import dataclasses

    encodings = args.weight_encoding or [hardware.weight_encoding]
    widths = args.adc_bits if args.adc_bits is not None else [hardware.adc_bits]
    variants = [dataclasses.replace(hardware, weight_encoding=encoding, adc_bits=bits)
                for encoding in encodings for bits in widths]
    notes = [f"--{flag.replace('_', '-')} {' '.join(map(str, values))} overrides the "
             f"checkpoint's {getattr(hardware, flag)}"
             for flag, values in (("weight_encoding", args.weight_encoding),
                                  ("adc_bits", args.adc_bits))
             if values and any(value != getattr(hardware, flag) for value in values)]
    return variants, notes


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

    from nptwofold.cim.tools import (calibration_cache, dataset_of, hardware_line,
                                     open_checkpoint, options_of)
    from nptwofold.cim.network import CimNetwork
    from nptwofold.cim.variation import is_ideal_device
    from nptwofold.errors import NptwofoldError

    options = options_of(args)
    model, method, content, hardware, notes = open_checkpoint(args.checkpoint, args, SWEPT)
    if args.chips > 1 and is_ideal_device(hardware):
        raise NptwofoldError(f"--chips {args.chips}: the device model is ideal, so every chip "
                             "is the nominal array; set a spread, read noise or stuck-at rate "
                             "with --hw (docs/cim-model.md)")
    variants, list_notes = hardware_variants(args, hardware)
    notes += list_notes
    network = CimNetwork(model, method, variants[0])
    dataset = dataset_of(options, content)
    images = dataset.test_images[:options.images]
    labels = dataset.test_labels[:options.images]

    started = time.perf_counter()
    cache = calibration_cache(args.checkpoint, options, dataset, log=tqdm.write,
                              content=content)
    cache.prepare(network)
    networks = [network.with_hardware(variant) for variant in variants]
    for variant in networks:
        cache.ensure_adc(variant)
        for other in [network, *networks]:  # the same encoding's other widths share them
            other.adc_histograms = {**variant.adc_histograms, **other.adc_histograms}
            other.select_adc_histograms()
    cache.save(network)
    seconds = dict(calibration=time.perf_counter() - started)

    # one bar per run, counting test images: the runs differ in speed by orders of
    # magnitude, so only a run's own bar can give a true ETA
    def run(label, logits_of):
        with tqdm(total=len(images), unit="img", desc=label, leave=False,
                  disable=args.no_progress) as bar:
            return run_batches(images, options.eval_batch_size, logits_of, bar)

    float_predictions, seconds["float"] = run("float", network.float_logits)
    fake_predictions, seconds["fake_quant"] = run("fake-quant", network.fake_quant_logits)
    runs = []
    for variant in networks:
        label = f"CIM {variant.hardware.weight_encoding}, {adc_label(variant.hardware.to_dict())}"
        chips = []
        for chip in range(args.chips):
            variant.draw_chip((args.chip_seed, chip))
            chips.append(run(label + (f", chip {chip}" if args.chips > 1 else ""),
                             variant.cim_logits))
        runs.append((variant, chips))

    baseline = None
    if args.baseline:
        baseline = baseline_energy(args.baseline, hardware, dataset, images, options)
    results = []
    for variant, chips in runs:
        energy = variant.energy_report(baseline)
        used = variant.hardware
        accuracies = [float(np.mean(predictions == labels)) for predictions, _ in chips]
        results.append(dict(
            encoding=used.weight_encoding, adc_bits=used.adc_bits,
            adc_range=used.adc_range, hardware=used.to_dict(),
            accuracy=float(np.mean(accuracies)),
            accuracy_sd=float(np.std(accuracies, ddof=1)) if len(chips) > 1 else 0.0,
            accuracy_worst=min(accuracies), chip_accuracies=accuracies,
            chip_seconds=[elapsed for _, elapsed in chips],
            fake_quant_agreement=float(np.mean([predictions == fake_predictions
                                                for predictions, _ in chips])),
            seconds=sum(elapsed for _, elapsed in chips),
            layers=[{**summary, **row} for summary, row in zip(variant.layer_summary(),
                                                               energy["layers"])],
            total=energy["total"]))
    return dict(
        checkpoint=str(args.checkpoint), data=dataset.source, n_images=len(images),
        baseline=(f"{args.baseline}, counted on the same images" if args.baseline else
                  "the same weights on every row, same encoding, no LFSR"),
        calibration_images=len(cache.images), calibration="; ".join(cache.notes),
        array=hardware_line(hardware, notes), hardware=hardware.to_dict(),
        chips=args.chips, chip_seed=args.chip_seed,
        hardware_notes=notes,
        accuracy=dict(float=float(np.mean(float_predictions == labels)),
                      fake_quant=float(np.mean(fake_predictions == labels))),
        seconds=seconds, runs=results)


def baseline_energy(path, hardware, dataset, images, options):
    """energy_report of the baseline checkpoint on `images`, by counting (ideal-ADC run), on
    the evaluated checkpoint's array with the baseline's own weight bits."""
    import dataclasses

    from nptwofold.cim.tools import calibration_cache
    from nptwofold.cim.network import CimNetwork

    network, content = CimNetwork.from_checkpoint(path)
    network = CimNetwork(network.model, network.method, dataclasses.replace(
        hardware, weight_bits=network.hardware.weight_bits))
    cache = calibration_cache(path, options, dataset, content=content)
    cache.prepare(network)
    cache.save(network)
    network.count_energy(images, options.eval_batch_size)
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
        result["array"],
        f"accuracy: float {accuracy['float']:.4f}, fake-quant (ideal ADC) "
        f"{accuracy['fake_quant']:.4f}",
        f"energy per image, nJ (dense: {result['baseline']}; ratio = dense / this; "
        "= fq: share of images the CIM run classifies as the fake-quant run does)",
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
    if result["chips"] > 1:
        lines.append(f"{result['chips']} chips per run, chip i drawn from the seed "
                     f"({result['chip_seed']}, i):")
        for run in result["runs"]:
            lines.append(
                f"  {run['encoding']}, {adc_label(run)}: accuracy mean {run['accuracy']:.4f}, "
                f"sd {run['accuracy_sd']:.4f}, worst {run['accuracy_worst']:.4f}; per chip "
                + " ".join(f"{accuracy:.4f}" for accuracy in run["chip_accuracies"])
                + "; seconds per pass " + " ".join(f"{s:.1f}" for s in run["chip_seconds"]))
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
    threads = threads_flag(argv)
    configure_threads(threads, numba_threads=threads)
    args = parse_args(argv)

    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_file

    try:
        for path in (args.json, args.csv, args.plot, args.calibration):
            check_output_file(path)
        result = evaluate_on_array(args)
        print(format_table(result))
        write_outputs(args, result)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
