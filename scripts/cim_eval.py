"""Run a checkpoint on the simulated CIM array: test accuracy of the float, fake-quant and CIM
runs, and energy per image per layer (cells / ADC / LFSR, cell-state histogram) with its ratio
to a dense 8-bit baseline (`nptwofold.cim_network`): by default the same weights mapped dense,
with `--baseline CKPT` a separately trained dense model run on the same images (its energy
counted from its own activations, SPEC 5's counting path).

    python scripts/cim_eval.py CKPT [--baseline CKPT] [--data PATH|sample] [--images N]
        [--adc-bits N] [--hw-config JSON] [--hw KEY=VALUE ...] [--calib-images N]
        [--json OUT] [--csv OUT] [--threads N]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

NANOJOULE = 1e3  # pJ per nJ: the table prints nJ, the files keep pJ


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--baseline", metavar="CKPT",
                        help="dense 8-bit baseline checkpoint to compare the energy with "
                        "(default: this checkpoint's weights mapped dense)")
    parser.add_argument("--data", help="CIFAR-10 tarball or folder, 'sample' or 'cifar10' "
                        "(default: the data the checkpoint was trained on)")
    parser.add_argument("--images", type=int, help="first N test images (default: all)")
    parser.add_argument("--adc-bits", type=int, help="ADC bits, 0 = ideal (default: the "
                        "hardware config's, else ideal)")
    parser.add_argument("--hw-config", help="HardwareConfig JSON file (default: SPEC values)")
    parser.add_argument("--hw", action="append", default=[], metavar="KEY=VALUE",
                        help="override one HardwareConfig field, the value in JSON; repeatable "
                        "(--hw crossbar_rows=256 --hw 'cell_energy_pj=[0.08,0.36,0.73,1.49]')")
    parser.add_argument("--calib-images", type=int, default=500,
                        help="training images that calibrate the activation clips; the clips "
                        "are stored in the checkpoint (/cim) and reused by later runs")
    parser.add_argument("--recalibrate", action="store_true",
                        help="calibrate again even if the checkpoint holds clips")
    parser.add_argument("--weight-bits", type=int,
                        help="bits of a float checkpoint's weights (default 8)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of the CIM kernel (default 2)")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--csv", metavar="OUT", help="write the per-layer rows as CSV")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("images", "calib_images", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def format_table(result):
    """The readable report: accuracies, then energy per image per layer in nJ."""
    accuracy = result["accuracy"]
    hardware = result["hardware"]
    adc = f"{hardware['adc_bits']}-bit ADC" if hardware["adc_bits"] else "ideal ADC"
    lines = [
        f"{result['checkpoint']}: {result['n_images']} test images from {result['data']}; "
        f"{hardware['activation_bits']}-bit inputs, {adc}, {hardware['crossbar_rows']}-row "
        f"crossbars; activation clips {result['clips']}",
        f"accuracy: float {accuracy['float']:.4f}, fake-quant {accuracy['fake_quant']:.4f}, "
        f"CIM {accuracy['cim']:.4f} (CIM = fake-quant prediction on "
        f"{result['cim_fake_quant_agreement']:.2%} of images)",
        f"energy per image, nJ (dense: {result['baseline']}; ratio = dense / CIM)",
        f"{'layer':<16}{'kept/rows':>10}{'tiles':>6}{'cells':>9}{'ADC':>8}{'LFSR':>7}"
        f"{'total':>9}{'c00':>6}{'c01':>6}{'c10':>6}{'c11':>6}{'dense':>9}{'ratio':>7}",
    ]
    for row in result["layers"] + [result["total"]]:
        shape = f"{row['kept']}/{row['rows']}" if "rows" in row else ""
        lines.append(
            f"{row['layer']:<16}{shape:>10}{row.get('tiles', ''):>6}"
            f"{row['cells_pj'] / NANOJOULE:>9.1f}{row['adc_pj'] / NANOJOULE:>8.1f}"
            f"{row['lfsr_pj'] / NANOJOULE:>7.1f}{row['total_pj'] / NANOJOULE:>9.1f}"
            + "".join(f"{row['cells_' + s]:>6.2f}" for s in ("00", "01", "10", "11"))
            + f"{row['baseline_total_pj'] / NANOJOULE:>9.1f}{row['baseline_ratio']:>7.2f}")
    seconds = result["seconds"]
    lines.append(f"time: calibration {seconds['calibration']:.1f} s, float {seconds['float']:.1f}"
                 f" s, fake-quant {seconds['fake_quant']:.1f} s, CIM {seconds['cim']:.1f} s "
                 f"({100 * seconds['cim'] / result['n_images']:.1f} s per 100 images)")
    return "\n".join(lines)


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


def evaluate_on_array(args):
    import numpy as np
    from tqdm import tqdm

    from nptwofold.cim_network import CimNetwork
    from nptwofold.data import load_dataset
    from nptwofold.hardware import HardwareConfig

    settings = HardwareConfig.from_json(args.hw_config).to_dict() if args.hw_config else {}
    settings.update(hardware_overrides(args.hw))
    if args.adc_bits is not None:
        settings["adc_bits"] = args.adc_bits
    hardware = HardwareConfig.from_json(settings)  # validates keys and values
    network, content = CimNetwork.from_checkpoint(args.checkpoint, hardware, args.weight_bits)
    dataset = load_dataset(args.data or content["config"].get("data", "cifar10"))
    images = dataset.test_images[:args.images]
    labels = dataset.test_labels[:args.images]

    seconds = dict(calibration=0.0, float=0.0, fake_quant=0.0, cim=0.0)
    calibration = dataset.train_images[:args.calib_images]
    started = time.perf_counter()
    calibrated = network.calibrate_checkpoint(args.checkpoint, content, calibration,
                                              args.batch_size, args.recalibrate)
    seconds["calibration"] = time.perf_counter() - started
    runs = dict(float=network.float_logits, fake_quant=network.fake_quant_logits,
                cim=network.cim_logits)
    predictions = {name: [] for name in runs}
    with tqdm(total=len(images), unit="img", desc="cim eval", disable=args.no_progress) as bar:
        for start in range(0, len(images), args.batch_size):
            batch = images[start:start + args.batch_size]
            for name, logits_of in runs.items():
                started = time.perf_counter()
                predictions[name].append(logits_of(batch).argmax(axis=1))
                seconds[name] += time.perf_counter() - started
            bar.update(len(batch))
    predictions = {name: np.concatenate(found) for name, found in predictions.items()}

    baseline = None
    if args.baseline:
        baseline = baseline_energy(args.baseline, hardware, dataset, images, args)
    energy = network.energy_report(baseline)
    layers = [{**summary, **row}
              for summary, row in zip(network.layer_summary(), energy["layers"])]
    return dict(
        checkpoint=str(args.checkpoint), data=dataset.source, n_images=len(images),
        baseline=(f"{args.baseline}, counted on the same images" if args.baseline else
                  "the same weights on every row, no LFSR"),
        calibration_images=len(calibration),
        clips=("calibrated now, stored in the checkpoint" if calibrated else
               "stored in the checkpoint by an earlier calibration"),
        hardware=hardware.to_dict(),
        accuracy={name: float(np.mean(found == labels)) for name, found in predictions.items()},
        cim_fake_quant_agreement=float(np.mean(predictions["cim"] == predictions["fake_quant"])),
        seconds=seconds, layers=layers, total=energy["total"])


def baseline_energy(path, hardware, dataset, images, args):
    """energy_report of the baseline checkpoint on `images`, by counting (ideal-ADC run)."""
    from nptwofold.cim_network import CimNetwork

    network, content = CimNetwork.from_checkpoint(path, hardware)
    network.calibrate_checkpoint(path, content, dataset.train_images[:args.calib_images],
                                 args.batch_size, args.recalibrate)
    network.count_energy(images, args.batch_size)
    return network.energy_report()


def main(argv=None):
    args = parse_args(argv)
    # The CIM kernel (Numba threads, parallel over output positions) is nearly all the work;
    # the float forwards' BLAS calls are small, so BLAS keeps one thread and never spins
    # against the Numba pool.
    configure_threads(1)
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)

    from nptwofold.errors import NptwofoldError
    from nptwofold.files import write_csv, write_json

    try:
        result = evaluate_on_array(args)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    if args.csv:
        write_csv(args.csv, result["layers"] + [result["total"]])


if __name__ == "__main__":
    main()
