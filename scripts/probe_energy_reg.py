"""Energy regularizer strength probe: from the short baseline, STEPS twofold steps at a constant
learning rate with the energy regularizer only (Reg_Net and Reg_Bit off), then re-binarize and
measure the test accuracy and the estimated cell energy per image, sum_i a_i e(q_i) (a_i on the
first 500 training images), in the chosen encoding.

    python scripts/probe_energy_reg.py SPARSITY LAMBDA_E STEPS LR --data $DATA \
        [--weight-encoding sign_magnitude] [--mask-group 1]      (from the repository root)

Exploratory: what it printed is in results/energy-reg/probe.jsonl; results/energy-reg/README.md quotes it.
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nptwofold.threads import configure_threads  # noqa: E402

configure_threads(1)
from nptwofold.config import TrainConfig  # noqa: E402
from nptwofold.data import load_dataset  # noqa: E402
from nptwofold.steps import evaluate  # noqa: E402
from nptwofold.kernels.quant import ENCODINGS  # noqa: E402
from nptwofold.options import ScriptParser  # noqa: E402
from nptwofold.train import Trainer  # noqa: E402

parser = ScriptParser(__doc__)
for name, kind, text in (("sparsity", float, "network sparsity p"),
                         ("lambda_energy", float, "energy regularizer strength lambda_E"),
                         ("steps", int, "training steps"), ("lr", float, "learning rate")):
    parser.add_argument(name, type=kind, help=text)
parser.add_argument("--weight-encoding", default="sign_magnitude", choices=ENCODINGS,
                    help="the array's weight encoding")
parser.add_argument("--mask-group", type=int, default=1, help="columns per LFSR index set")
parser.add_argument("--data", default="cifar10", help="CIFAR-10 tarball or folder, or 'cifar10'")
args = parser.parse_args()

data = load_dataset(args.data)
config = TrainConfig.from_preset(
    "short", epochs=2, lr=args.lr, warmup_epochs=0, schedule="step", milestones=[99],
    init=str(REPO / "results/short-seed0/last.h5"),
    twofold=dict(sparsity=args.sparsity, lambda_net=0.0, beta_bit=0.0,
                 lambda_energy=args.lambda_energy, mask_group=args.mask_group),
    hardware=dict(weight_encoding=args.weight_encoding))
trainer = Trainer(config, data, None, progress=False)


def report(stage):
    trainer.method.rebinarize()
    trainer.method.measure_activity()
    accuracy = evaluate(trainer.model, data.test_images, data.test_labels, 128)[1]
    total = trainer.method.layer_report()[-1]
    print(json.dumps(dict(stage=stage, **vars(args), accuracy=accuracy,
                          cell_uj=total["cell_pj"] / 1e6, cells_00=total["cells_00"],
                          zero_weight_share=total["zero_weight_share"])), flush=True)


report("start")
trainer.run(max_steps=args.steps)
report(f"after {args.steps} steps")
