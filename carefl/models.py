"""MONAI networks by name, made ready for Opacus DP-SGD.

    build_model(cfg) -> nn.Module          # cfg.model + cfg.task (+ cfg.seed for the init)
    spatial_multiple(model_cfg) -> int     # each input side must be a multiple of this
    plain_state_dict(module) -> dict       # the plain model's weights (no Opacus prefix)

Shapes: segmentation nets map images ``(N, in_channels, *spatial)`` to logits
``(N, num_classes, *spatial)``; classification nets map them to logits ``(N, num_classes)``;
``spatial`` is ``(H, W)`` or ``(D, H, W)`` per ``cfg.task.spatial_dims``.

What "DP-ready" means here (per-sample gradients through Opacus' backward hooks):

- Normalisation is GroupNorm, which normalises each sample on its own; BatchNorm mixes the
  samples of a batch, so one record would leak into every other record's gradient.
- No in-place activations: Opacus' hooks hand each layer's output to autograd as a view, and
  an in-place ReLU on that view fails on the first DP backward ("Output 0 of
  BackwardHookFunction is a view and is being modified inplace"). MONAI's DenseNet121
  (ReLU) and BasicUNet (LeakyReLU) default to ``inplace=True``; we pass MONAI's own ``act``
  argument with ``inplace=False``. None of the four nets here adds residuals in place
  (MONAI's ResidualUnit returns ``cx + res``), so no module needs patching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers import Norm
from monai.networks.nets import UNet, BasicUNet, DenseNet121
from torch import nn

from carefl.choices import NET_KINDS
from carefl.errors import ConfigError


def _group_norm(num_channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(num_groups, num_channels)`` groups.

    MONAI passes one norm spec to every layer of a net, but the widths differ: UNet's last
    up-sampling block normalises ``num_classes`` channels (often 1). Taking the gcd keeps the
    configured group count wherever it divides the width and never builds an invalid layer.
    """
    return nn.GroupNorm(math.gcd(num_groups, num_channels), num_channels)


# MONAI's documented extension point: norm=("carefl_group", {"num_groups": g}) in any net.
Norm.add_factory_callable("carefl_group", lambda _spatial_dims=None: _group_norm)


def _norm(model_cfg: Mapping[str, Any]) -> tuple[str, dict]:
    return ("carefl_group", {"num_groups": int(model_cfg["norm_groups"])})


def _unet(m: Mapping[str, Any], task: Mapping[str, Any]) -> nn.Module:
    # Default act is PReLU (never in place); residual units add out of place.
    return UNet(
        spatial_dims=task["spatial_dims"],
        in_channels=task["in_channels"],
        out_channels=task["num_classes"],
        channels=tuple(m["channels"]),
        strides=tuple(m["strides"]),
        num_res_units=m["num_res_units"],
        norm=_norm(m),
    )


def _basicunet(m: Mapping[str, Any], task: Mapping[str, Any]) -> nn.Module:
    return BasicUNet(
        spatial_dims=task["spatial_dims"],
        in_channels=task["in_channels"],
        out_channels=task["num_classes"],
        features=tuple(m["features"]),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=_norm(m),
    )


def _densenet121(m: Mapping[str, Any], task: Mapping[str, Any]) -> nn.Module:
    return DenseNet121(
        spatial_dims=task["spatial_dims"],
        in_channels=task["in_channels"],
        out_channels=task["num_classes"],
        act=("relu", {"inplace": False}),
        norm=_norm(m),
    )


def _classifier(m: Mapping[str, Any], task: Mapping[str, Any]) -> nn.Module:
    """Small CNN: one MONAI ResidualUnit (or Convolution) per stride, global average pool, Linear.

    Unlike ``monai.networks.nets.Classifier`` it does not bake the input size into its Linear
    layer, so one config serves 28x28 MedMNIST and 64x64 synthetic images alike.
    """
    dims, act, norm = task["spatial_dims"], ("relu", {"inplace": False}), _norm(m)
    layers: list[nn.Module] = []
    in_ch = task["in_channels"]
    for out_ch, stride in zip(m["channels"], m["strides"], strict=True):
        if m["num_res_units"] > 0:
            layers.append(ResidualUnit(dims, in_ch, out_ch, strides=stride,
                                       subunits=m["num_res_units"], act=act, norm=norm))
        else:
            layers.append(Convolution(dims, in_ch, out_ch, strides=stride, act=act, norm=norm))
        in_ch = out_ch
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    layers += [pool, nn.Flatten(), nn.Linear(in_ch, task["num_classes"])]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class _Net:
    kind: str  # the task kind the net solves (carefl.choices.NET_KINDS)
    build: Callable[[Mapping[str, Any], Mapping[str, Any]], nn.Module]
    multiple: Callable[[Mapping[str, Any]], int]  # see spatial_multiple


#: model.name -> (builder, spatial multiple); the names and kinds are carefl.choices.NET_KINDS
_BUILDERS: dict[str, tuple[Callable, Callable[[Mapping[str, Any]], int]]] = {
    "unet": (_unet, lambda m: math.prod(m["strides"])),
    "basicunet": (_basicunet, lambda m: 16),  # 4 max-pools
    # stride-2 stem + max-pool + 3 transitions; the head pools adaptively
    "densenet121": (_densenet121, lambda m: 32),
    "classifier": (_classifier, lambda m: math.prod(m["strides"])),
}
assert set(_BUILDERS) == set(NET_KINDS), "every net in carefl.choices.NET_KINDS needs a builder, and no other"
_NETS: dict[str, _Net] = {name: _Net(NET_KINDS[name], *_BUILDERS[name]) for name in NET_KINDS}


def _net(model_cfg: Mapping[str, Any]) -> _Net:
    name = model_cfg["name"]
    if name not in _NETS:
        raise ConfigError(f"model={name} is unknown; choose model= one of {sorted(_NETS)}")
    return _NETS[name]


def spatial_multiple(model_cfg: Mapping[str, Any]) -> int:
    """Each spatial side of the input must be a multiple of this (also the smallest side).

    Args:
        model_cfg: ``cfg.model``.
    Returns:
        side multiple in voxels, e.g. 4 for a UNet with strides [2, 2].
    """
    return _net(model_cfg).multiple(model_cfg)


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build ``cfg.model.name`` for ``cfg.task``, initialised deterministically from ``cfg.seed``.

    Args:
        cfg: composed config; reads ``model`` (name + its keys, see conf/model/),
            ``task.kind``/``spatial_dims``/``in_channels``/``num_classes`` and ``seed``.
    Returns:
        an ``nn.Module`` with GroupNorm and no in-place ops (see the module docstring).
    Raises:
        ConfigError: unknown model name, or a net that does not solve ``task.kind``.
    """
    net, task = _net(cfg["model"]), cfg["task"]
    if net.kind != task["kind"]:
        valid = sorted(n for n, s in _NETS.items() if s.kind == task["kind"])
        raise ConfigError(
            f"model={cfg['model']['name']} builds a {net.kind} net but task={task['name']} "
            f"is {task['kind']}; choose model= one of {valid}"
        )
    # fork_rng: seed the init without moving the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))
        return net.build(cfg["model"], task)


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model, whether or not Opacus wrapped it.

    Opacus' GradSampleModule stores the net as ``_module``, so its keys read
    ``_module.conv.weight``; the server and every other hospital expect ``conv.weight``.
    Returns detached CPU tensors keyed by the plain model's names.
    """
    prefix = "_module."
    return {
        (k[len(prefix):] if k.startswith(prefix) else k): v.detach().cpu()
        for k, v in module.state_dict().items()
    }
