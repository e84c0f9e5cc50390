"""What every peer's hospital does, written once against torch + MONAI + Opacus only.

The peers (``flower_peer.py``, ``nvflare_client.py``) run in their own virtualenvs, so this file
imports nothing from CareFL; ``run.py`` checks that ``build_unet`` loads CareFL's initial weights
with ``strict=True`` (same layers, same shapes) and that the data files hold CareFL's tensors.

Data: one ``<hospital>.npz`` per hospital, written by ``run.py``: ``train_images`` /
``test_images`` float32 ``(N, 1, H, W)``, ``train_labels`` / ``test_labels`` float32 masks
``(N, 1, H, W)`` in {0, 1}; ``init.pt`` is the shared initial state dict; ``spec.json`` the
recipe (UNet shape, lr, batch size, epochs, rounds, DP sigma / C).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)  # CareFL's federation.torch_threads: one intra-op thread per process


def read_spec(data_dir: str | Path) -> dict:
    """The recipe ``run.py`` wrote (keys: hospitals, channels, strides, num_res_units, norm_groups,
    lr, batch_size, local_epochs, rounds, dp: null | {noise_multiplier, max_grad_norm})."""
    return json.loads((Path(data_dir) / "spec.json").read_text())


def _group_norm(num_channels: int, num_groups: int) -> torch.nn.GroupNorm:
    return torch.nn.GroupNorm(math.gcd(num_groups, num_channels), num_channels)


# MONAI's extension point for norms: GroupNorm with gcd(groups, width) groups, because MONAI's
# plain ("group", {...}) fails on the UNet's 1-channel top block (CareFL does the same).
Norm.add_factory_callable("peer_group", lambda _spatial_dims=None: _group_norm)


class UNet2D(UNet):
    """MONAI UNet as conf/model/unet.yaml describes it: ``(N, 1, H, W)`` -> logits ``(N, 1, H, W)``.
    A class of its own with plain keyword arguments, because NVFlare's recipe rebuilds the
    model on its server from the class path and the constructor's arguments."""

    def __init__(self, channels: list[int], strides: list[int], num_res_units: int, norm_groups: int):
        super().__init__(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels),
                         strides=tuple(strides), num_res_units=num_res_units,
                         norm=("peer_group", {"num_groups": norm_groups}))


def unet_args(spec: dict) -> dict:
    """``UNet2D``'s arguments from the spec."""
    return {k: spec[k] for k in ("channels", "strides", "num_res_units", "norm_groups")}


def build_unet(spec: dict) -> torch.nn.Module:
    """A ``UNet2D`` as ``spec`` describes it (randomly initialised)."""
    return UNet2D(**unet_args(spec))


def load_site(data_dir: str | Path, hospital: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of one hospital's npz; items ``(image (1,H,W), mask (1,H,W))``."""
    with np.load(Path(data_dir) / f"{hospital}.npz") as z:
        return (TensorDataset(torch.from_numpy(z["train_images"]), torch.from_numpy(z["train_labels"])),
                TensorDataset(torch.from_numpy(z["test_images"]), torch.from_numpy(z["test_labels"])))


def train(model: torch.nn.Module, data: TensorDataset, spec: dict, round_seed: int) -> dict:
    """Local training as CareFL does it: Adam(lr), DiceCE on the sigmoid, ``local_epochs`` epochs
    of batches of ``batch_size``; under ``spec["dp"]`` Opacus DP-SGD with Poisson sampling at
    q = 1/ceil(N/B) and a PrivacyEngine made here, i.e. afresh every round (as Flower's Opacus
    example does; its epsilon restarts each round). ``model`` is trained in place (Opacus wraps
    it without copying); build a fresh one each round under DP (its hooks stay on). Returns
    ``{"loss", "train_seconds" (wall, s), "steps", "num_examples", "epsilon" (this round's
    alone, at delta 1e-5; absent without DP)}``."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(round_seed)
    loader = DataLoader(data, batch_size=int(spec["batch_size"]), shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(spec["lr"]))
    loss_fn = DiceCELoss(sigmoid=True)
    model.train()  # Opacus refuses a module in eval mode
    engine = None
    if spec.get("dp"):
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, poisson_sampling=True,
            noise_multiplier=float(spec["dp"]["noise_multiplier"]), max_grad_norm=float(spec["dp"]["max_grad_norm"]),
        )
    losses, steps = [], 0
    for _ in range(int(spec["local_epochs"])):
        for images, masks in loader:
            if len(images) == 0:  # empty Poisson batch: GroupNorm's per-sample path cannot take it
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), masks)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            steps += 1
    out = {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps,
           "num_examples": len(data), "train_seconds": time.perf_counter() - start}
    if engine is not None:
        out["epsilon"] = float(engine.get_epsilon(1e-5))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorDataset) -> dict:
    """Mean Dice over the test images (MONAI ``DiceMetric``, sigmoid > 0.5, background included
    as CareFL does for its one foreground logit) and ``eval_seconds`` (wall, s)."""
    start = time.perf_counter()
    model.eval()
    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    for images, masks in DataLoader(data, batch_size=32):
        metric(y_pred=(torch.sigmoid(model(images)) > 0.5).float(), y=masks)
    return {"dice": float(metric.aggregate()), "eval_seconds": time.perf_counter() - start}


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``, KiB on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
