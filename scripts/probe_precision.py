"""How much bit-level sparsity lies in the low bit planes: drop the k lowest planes of every
layer of a trained twofold model (round q to multiples of 2^k), with no further training, and
measure loss, accuracy and 00-cell share on the first 2,000 test images.

    python scripts/probe_precision.py runs/p00-bitreg-off/post/last.h5 [DATA]

DATA is the full CIFAR-10 (tarball or folder); default 'cifar10' (datasets/, else download).
results/README.md has the command that trains the checkpoint (a p = 0 twofold run without
bit-level training, from the short baseline).

Exploratory; its output is in results/reg-bit-probe/precision_probe.txt and results/README.md
quotes it.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nptwofold.threads import configure_threads  # noqa: E402

configure_threads(2)
from nptwofold.data import load_dataset  # noqa: E402
from nptwofold.build import load_model  # noqa: E402
from nptwofold.options import ScriptParser  # noqa: E402
from nptwofold.steps import evaluate  # noqa: E402

parser = ScriptParser(__doc__)
parser.add_argument("checkpoint", help="a trained twofold checkpoint")
parser.add_argument("data", nargs="?", default="cifar10", help="CIFAR-10 tarball or folder")
args = parser.parse_args()
data = load_dataset(args.data)
images, labels = data.test_images[:2000], data.test_labels[:2000]
print("dropped planes | test loss | accuracy | 00 cells")
for dropped in (0, 1, 2, 3):
    model, method, _ = load_model(args.checkpoint)
    for layer in method.layers.values():
        layer.dropped_planes = dropped
    method.rebinarize()
    loss, accuracy = evaluate(model, images, labels, 500)
    print(f"{dropped} | {loss:.4f} | {100 * accuracy:.2f} % | "
          f"{method.layer_report()[-1]['cells_00']:.3f}", flush=True)
