"""Mask group x sparsity on the physical mapping: a checkpoint's weights pruned with fresh LFSR
keep-masks (`CimNetwork.prune`, no training) for each mask group, then per group the rows each
column tile stores and the energy per image against the same weights mapped dense.

    python scripts/cim_mask_groups.py CKPT [--sparsity 0.5] [--groups 1 4 8 32]
        [--encoding E [E ...]] [--images N] [--calib-images N] [--data PATH] [--json OUT]

The accuracy printed is that of the untrained pruned model (fake-quant, ideal ADC): it says
nothing about a trained twofold model; the stored rows and the energy ratio do not depend on
training (only on the masks, the encoding and, slightly, on the activations). Energy is counted
on the fake-quant forward (ideal ADC; equal to the CIM run's events, tested).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser  # noqa: E402
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

NANOJOULE = 1e3
ENCODINGS = ("twos_complement", "offset_binary", "sign_magnitude")


def parse_args(argv):
    parser = ScriptParser(__doc__)
    parser.add_argument("checkpoint", help="a dense (float) checkpoint")
    parser.add_argument("--sparsity", type=float, default=0.5, help="network sparsity p")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 32],
                        help="mask groups to compare")
    parser.add_argument("--encoding", nargs="+", choices=ENCODINGS, default=["sign_magnitude"],
                        help="weight encodings")
    parser.add_argument("--images", type=int, default=1000, help="first N test images")
    parser.add_argument("--calib-images", type=int, default=100,
                        help="training images that calibrate each pruned model's clips")
    parser.add_argument("--data", help="CIFAR-10 tarball or folder (default: the checkpoint's)")
    parser.add_argument("--json", metavar="OUT", help="write the table as JSON")
    parser.add_argument("--threads", type=int, default=2, help="threads of the CIM kernels")
    args = parser.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        parser.error(f"--sparsity must be in [0, 1) (got {args.sparsity})")
    for name in ("images", "calib_images", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.groups) < 1:
        parser.error("--groups must be >= 1")
    return args


def group_row(network, images, labels, calibration, encoding, group):
    """One table row: the network pruned with masks of `group` columns, counted on `images`."""
    import numpy as np

    network.calibrate(calibration)
    predictions = network.count_energy(images)
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
    args = parse_args(argv)
    configure_threads(args.threads, numba_threads=args.threads)
    from nptwofold.cim_network import CimNetwork
    from nptwofold.data import load_dataset
    from nptwofold.errors import NptwofoldError
    from nptwofold.files import check_output_file, write_json
    from nptwofold.hardware import HardwareConfig

    try:
        check_output_file(args.json)
        rows = []
        for encoding in args.encoding:
            for group in args.groups:
                network, content = CimNetwork.from_checkpoint(
                    args.checkpoint, HardwareConfig(weight_encoding=encoding))
                if network.method is not None:
                    raise NptwofoldError(f"{args.checkpoint} is a twofold model; give the dense "
                                         "checkpoint its masks are drawn for")
                dataset = load_dataset(args.data or content["config"].get("data", "cifar10"))
                network.prune(args.sparsity, group)
                rows.append(group_row(network, dataset.test_images[:args.images],
                                      dataset.test_labels[:args.images],
                                      dataset.train_images[:args.calib_images], encoding, group))
                row = rows[-1]
                print(f"{encoding:<16} group {group:>3}: kept {row['kept_rows_share']:.3f}, "
                      f"stored {row['stored_rows_share']:.3f} of the rows; "
                      f"{row['total_pj'] / NANOJOULE:.1f} nJ vs dense "
                      f"{row['dense_pj'] / NANOJOULE:.1f} nJ, ratio {row['energy_ratio']:.2f}; "
                      f"untrained pruned accuracy {row['untrained_pruned_accuracy']:.4f}",
                      flush=True)
        if args.json:
            write_json(args.json, dict(checkpoint=args.checkpoint, sparsity=args.sparsity,
                                       images=args.images, calib_images=args.calib_images,
                                       rows=rows))
            print(f"wrote {Path(args.json).absolute()}")
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
