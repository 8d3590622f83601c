"""Mask group x sparsity on the physical mapping: a checkpoint's weights pruned with fresh LFSR
keep-masks (`CimNetwork.prune`, no training) for each mask group, then per group the rows each
column tile stores and the energy per image against the same weights mapped dense.

    python scripts/cim_mask_groups.py CKPT [--sparsity 0.5] [--groups 1 4 8 32]
        [--weight-encoding E [E ...]] [--images N] [--calib-images N] [--data PATH]
        [--json OUT]

The array is CKPT's stored one, changed by the flags. The accuracy printed is that of the
untrained pruned model (fake-quant, ideal ADC): it says nothing about a trained twofold model;
the stored rows and the energy ratio do not depend on training (only on the masks, the encoding
and, slightly, on the activations). Energy is counted on the fake-quant forward (ideal ADC;
equal to the CIM run's events, tested). Each pruned model is calibrated afresh (its clips
depend on its masks), so no calibration file is read or written.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser, threads_flag  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

NANOJOULE = 1e3
SWEPT = ("weight_encoding",)


def parse_args(argv):
    from nptwofold.cim.tools import add_cim_flags
    from nptwofold.kernels.quant import ENCODINGS

    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="a dense (float) checkpoint")
    parser.add_argument("--sparsity", type=float, default=0.5, help="network sparsity p")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 32],
                        help="mask groups to compare")
    array = add_cim_flags(parser, hardware_skip=SWEPT, skip=("calibration", "recalibrate"))
    array.add_argument("--weight-encoding", nargs="+", choices=ENCODINGS,
                       help="weight encodings to compare (default: the checkpoint's)")
    parser.add_argument("--json", metavar="OUT", help="write the table as JSON")
    parser.add_argument("--threads", type=int, default=2, help="threads of the CIM kernels")
    args = parser.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        parser.error(f"--sparsity must be in [0, 1) (got {args.sparsity})")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if min(args.groups) < 1:
        parser.error("--groups must be >= 1")
    return args


def group_row(network, images, labels, calibration, encoding, group, batch_size):
    """One table row: the network pruned with masks of `group` columns, counted on `images`."""
    import numpy as np

    network.calibrate(calibration, batch_size)
    predictions = network.count_energy(images, batch_size)
    summary = network.layer_summary()
    total = network.energy_report()["total"]
    stored = sum(row["rows_per_tile_mean"] * row["column_tiles"] for row in summary)
    kept = sum(row["kept"] * row["column_tiles"] for row in summary)
    dense = sum(row["rows"] * row["column_tiles"] for row in summary)
    return dict(encoding=encoding, group=group, kept_rows_share=kept / dense,
                stored_rows_share=stored / dense,
                rows_per_tile={row["layer"]: row["rows_per_tile_mean"] for row in summary},
                total_pj=total["total_pj"], dense_pj=total["baseline_total_pj"],
                energy_ratio=total["baseline_ratio"],
                untrained_pruned_accuracy=float(np.mean(predictions == labels)))


def main(argv=None):
    threads = threads_flag(argv)
    configure_threads(threads, numba_threads=threads)
    args = parse_args(argv)
    import dataclasses

    from nptwofold.cim.tools import dataset_of, hardware_line, open_checkpoint, options_of
    from nptwofold.cim.network import CimNetwork
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_file, write_json

    try:
        check_output_file(args.json)
        options = options_of(args)
        model, method, content, hardware, notes = open_checkpoint(args.checkpoint, args, SWEPT)
        if method is not None:
            raise NptwofoldError(f"{args.checkpoint} is a twofold model; give the dense "
                                 "checkpoint its masks are drawn for")
        encodings = args.weight_encoding or [hardware.weight_encoding]
        if any(encoding != hardware.weight_encoding for encoding in encodings):
            notes.append(f"--weight-encoding {' '.join(encodings)} overrides the checkpoint's "
                         f"{hardware.weight_encoding}")
        print(hardware_line(hardware, notes))
        dataset = dataset_of(options, content)
        rows = []
        for encoding in encodings:
            for group in args.groups:
                network = CimNetwork(model, None, dataclasses.replace(
                    hardware, weight_encoding=encoding))
                network.prune(args.sparsity, group)
                rows.append(group_row(network, dataset.test_images[:options.images],
                                      dataset.test_labels[:options.images],
                                      dataset.train_images[:options.calib_images], encoding,
                                      group, options.eval_batch_size))
                row = rows[-1]
                print(f"{encoding:<16} group {group:>3}: kept {row['kept_rows_share']:.3f}, "
                      f"stored {row['stored_rows_share']:.3f} of the rows; "
                      f"{row['total_pj'] / NANOJOULE:.1f} nJ vs dense "
                      f"{row['dense_pj'] / NANOJOULE:.1f} nJ, ratio {row['energy_ratio']:.2f}; "
                      f"untrained pruned accuracy {row['untrained_pruned_accuracy']:.4f}",
                      flush=True)
        if args.json:
            write_json(args.json, dict(checkpoint=args.checkpoint, sparsity=args.sparsity,
                                       images=options.images, calib_images=options.calib_images,
                                       hardware=hardware.to_dict(), hardware_notes=notes,
                                       rows=rows))
            print(f"wrote {Path(args.json).absolute()}")
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
