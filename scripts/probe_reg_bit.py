"""Reg_Bit strength probe: from the short baseline, N twofold steps at constant lr, then
re-binarize and measure test accuracy, zero-bit share and 00-cell share.

    python scripts/probe_reg_bit.py SPARSITY LAMBDA BETA STEPS LR          (from the repo root)
    python scripts/probe_reg_bit.py 0 0 50 250 0.01 --then-beta 0     (two stages of STEPS)
    python scripts/probe_reg_bit.py 0 0 30 250 0.01 --form plane_lasso
    (add --data PATH for a local CIFAR-10 copy; the default 'cifar10' looks in datasets/,
    else downloads)

Exploratory: the numbers it printed are in results/reg-bit-probe/probe.jsonl; results/README.md quotes them. The lines
with "bit_rounding": "per_bit" came from commit 646377b, which had that option; the
plane_lasso lines ran with a "drop_plane_below" rule that never fired (no plane dropped).
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nptwofold.threads import configure_threads  # noqa: E402

configure_threads(1)
from nptwofold.data import load_dataset  # noqa: E402
from nptwofold.config import TrainConfig  # noqa: E402
from nptwofold.steps import evaluate  # noqa: E402
from nptwofold.options import ScriptParser  # noqa: E402
from nptwofold.train import Trainer  # noqa: E402

parser = ScriptParser(__doc__)
for name in ("sparsity", "lambda_net", "beta_bit", "steps", "lr"):
    parser.add_argument(name, type=int if name == "steps" else float,
                        help=f"{name} of the probe run")
parser.add_argument("--then-beta", type=float, help="a second stage of STEPS at this beta")
parser.add_argument("--form", default="poster", choices=["poster", "plane_lasso"],
                    help="Reg_Bit form")
parser.add_argument("--test-images", type=int, default=10000, help="test images evaluated")
parser.add_argument("--data", default="cifar10",
                    help="full CIFAR-10: tarball or folder, or 'cifar10' (datasets/ or download)")
args = parser.parse_args()

data = load_dataset(args.data)
config = TrainConfig.from_preset(
    "short", epochs=2, lr=args.lr, warmup_epochs=0, schedule="step", milestones=[99],
    init=str(REPO / "results/short-seed0/last.h5"),
    twofold=dict(sparsity=args.sparsity, lambda_net=args.lambda_net, beta_bit=args.beta_bit,
                 reg_bit_form=args.form))
trainer = Trainer(config, data, None, progress=False)


def probe(stage):
    """Accuracy and bit statistics of the re-binarized model; training continues unchanged."""
    layers = trainer.method.layers.items()
    saved = {name: layer.params["weight_bits"].copy() for name, layer in layers}
    plane_means = (sum(bits.reshape(len(bits), -1).sum(axis=1) for bits in saved.values())
                   / sum(bits[0].size for bits in saved.values())).round(3).tolist()
    trainer.method.rebinarize()
    accuracy = evaluate(trainer.model, data.test_images[:args.test_images],
                        data.test_labels[:args.test_images], 128)[1]
    total = trainer.method.layer_report()[-1]
    print(json.dumps(dict(stage=stage, **vars(args), accuracy=accuracy,
                          zero_bit_share=total["zero_bit_share"], cells_00=total["cells_00"],
                          zero_weight_share=total["zero_weight_share"], plane_means=plane_means)),
          flush=True)
    for name, layer in layers:
        layer.params["weight_bits"][...] = saved[name]


trainer.run(max_steps=args.steps)
probe(1)
if args.then_beta is not None:
    trainer.method.config.beta_bit = args.then_beta
    trainer.run(max_steps=args.steps)
    probe(2)
