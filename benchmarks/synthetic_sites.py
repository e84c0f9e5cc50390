"""Does federation matter on the synthetic consortium? Local-only vs pooled training.

Trains the default segmentation UNet (carefl.models.build_model: channels (16, 32, 64), strides (2, 2), one residual
unit, GroupNorm; Adam lr 3e-3, batch 16, Dice loss) once per site on that site's training
split alone, and once on the pooled training splits of all sites, then prints the mean Dice
(threshold 0.5) of every model on every site's test split and writes it as JSON.

    .venv/bin/python benchmarks/synthetic_sites.py [--task seg2d] [--epochs 5] [--local-epochs 15]
        [--seed 0] [--out x.json]

CPU only, ~15-25 s for seg2d on one core. Measured (seg2d, pooled 5 epochs, local-only 15 so
each local model gets at least as many steps as the pooled one), mean test Dice:

    seed  pooled on (st-mary, riverside, northfield)   local-only, mean off-site Dice
    0     0.860  0.873  0.859                          0.421  0.165  0.505
    1     0.781  0.880  0.870                          0.432  0.195  0.506
    2     0.856  0.791  0.813                          0.366  0.066  0.494

On its own site a local model reaches 0.87-0.98.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hydra import compose, initialize_config_dir
from monai.losses import DiceLoss
from torch.utils.data import ConcatDataset, DataLoader

from carefl.data import load_hospital
from carefl.models import build_model

CONF = str((__import__("pathlib").Path(__file__).resolve().parents[1] / "conf"))


def train(cfg, dataset, epochs: int, seed: int) -> torch.nn.Module:
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = DiceLoss(sigmoid=True)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def dice(model: torch.nn.Module, dataset) -> float:
    x, y = dataset.tensors
    pred = (model(x) > 0).float()
    axes = tuple(range(1, x.ndim))
    inter = (pred * y).sum(axes)
    return float((2 * inter / (pred.sum(axes) + y.sum(axes)).clamp_min(1e-6)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="seg2d", choices=["seg2d", "seg3d"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=None,
                        help="epochs of the local-only models (default --epochs; 3x gives them the pooled step count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=[f"task={args.task}", f"seed={args.seed}"])
    hospitals = list(cfg.federation.hospitals)
    data = [load_hospital(cfg, h, i) for i, h in enumerate(hospitals)]
    t0 = time.time()
    local_epochs = args.local_epochs or args.epochs
    models = {h: train(cfg, d.train, local_epochs, args.seed) for h, d in zip(hospitals, data)}
    models["pooled"] = train(cfg, ConcatDataset([d.train for d in data]), args.epochs, args.seed)
    table = {name: {h: dice(m, d.test) for h, d in zip(hospitals, data)} for name, m in models.items()}
    print(f"{args.task}, {args.epochs} epochs (local-only {local_epochs}), seed {args.seed}, train sizes "
          f"{[len(d.train) for d in data]}, {time.time() - t0:.0f} s")
    print(f"{'trained on':<12}" + "".join(f"{h:>12}" for h in hospitals) + f"{'off-site':>12}")
    for name, row in table.items():
        off = [v for h, v in row.items() if h != name]
        print(f"{name:<12}" + "".join(f"{v:>12.3f}" for v in row.values()) + f"{sum(off) / len(off):>12.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "epochs": args.epochs, "local_epochs": local_epochs, "seed": args.seed, "dice": table}, f, indent=2)


if __name__ == "__main__":
    main()
