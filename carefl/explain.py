"""Explanations a clinician can look at: where a model looked, and where it is unsure.

    maps = classification_maps(model, image, target)   # {"occlusion", "gradcam"}: (*spatial) in [0, 1]
    maps = segmentation_maps(model, image, window, k)  # {"probability", "uncertainty"}: (*spatial)
    save_overlay(image, maps, "p1_explain.png", title)

Classification (MONAI ``monai.visualize``):

- ``occlusion``: :class:`~monai.visualize.OcclusionSensitivity`: how much the target class's
  logit drops when a patch around each pixel is blurred out (higher = the model relied on it);
  min-max scaled to [0, 1] over the image.
- ``gradcam``: :class:`~monai.visualize.GradCAM` on the last convolution of the net (found by
  name), upsampled to the image, min-max scaled to [0, 1] (1 = strongest evidence for the class).

Segmentation (test-time augmentation): the study is predicted as it is and flipped along each
spatial axis (MONAI ``Flip``, each prediction flipped back), sliding windows as in evaluation.
``probability``: the mean over the 1 + dims predictions of the foreground probability (1 -
background for K >= 2); ``uncertainty``: the variance of that probability across them (in
[0, 0.25]; high where the model's answer depends on the flip, typically at lesion borders).

Written here: the flip TTA loop and the overlay (MONAI's ``TestTimeAugmentation`` needs a
random, invertible dictionary pipeline and a DataLoader per study; four deterministic flips say
the same thing for a segmentation net and cost four forward passes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def last_conv(model: nn.Module) -> str:
    """Name (``named_modules``) of the last convolution of ``model``: GradCAM's target layer."""
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not names:
        raise ValueError("the model has no convolution for GradCAM")
    return names[-1]


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = torch.nan_to_num(x.float())
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def classification_maps(model: nn.Module, image: torch.Tensor, target: int) -> dict[str, torch.Tensor]:
    """Occlusion and GradCAM maps of class ``target`` for ``image`` ``(C, *spatial)``; each
    ``(*spatial)`` float32 in [0, 1]."""
    from monai.visualize import GradCAM, OcclusionSensitivity

    model.eval()
    x = image[None].float()
    side = min(x.shape[2:])
    occlusion = OcclusionSensitivity(model, mask_size=max(2, side // 6), n_batch=16, overlap=0.5, verbose=False,
                                     activate=False)
    occ_map, _ = occlusion(x)
    # occ_map: (1, K, *spatial) logits with the patch occluded; relied-on = large drop
    drop = model(x)[0, target].detach() - occ_map[0, target]
    # MONAI's default normaliser maps the strongest activation to 0; keep the raw map, scale here
    cam = GradCAM(nn_module=model, target_layers=last_conv(model), postprocessing=lambda m: m)(x, class_idx=target)
    return {"occlusion": _unit(drop), "gradcam": _unit(cam[0, 0].detach())}


@torch.no_grad()
def segmentation_maps(model: nn.Module, image: torch.Tensor, window, num_classes: int) -> dict[str, torch.Tensor]:
    """Foreground probability and its flip-TTA variance for ``image`` ``(C, *spatial)``; each
    ``(*spatial)`` float32 (see the module docstring)."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import Flip

    model.eval()
    dims = image.ndim - 1
    probs = []
    for axis in (None, *range(dims)):
        flip = Flip(spatial_axis=axis) if axis is not None else None
        x = torch.as_tensor(flip(image) if flip else image).float()
        logits = sliding_window_inference(x[None], window.roi_size, window.sw_batch_size, model,
                                          overlap=window.overlap)[0]
        p = torch.sigmoid(logits[0]) if num_classes == 1 else 1 - torch.softmax(logits, dim=0)[0]
        probs.append(torch.as_tensor(flip(p[None]))[0] if flip else p)
    stack = torch.stack(probs)
    return {"probability": stack.mean(0), "uncertainty": stack.var(0, unbiased=False)}


def _middle(x: torch.Tensor) -> torch.Tensor:
    """A 2D view: ``x`` itself, or its middle slice along the last axis for 3D."""
    return x if x.ndim == 2 else x[..., x.shape[-1] // 2]


def save_overlay(image: torch.Tensor, maps: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """PNG: the image (first channel; 3D: middle slice of the last axis) and each map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = _middle(torch.as_tensor(image)[0].float()).numpy()
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.4))
    axes[0].imshow(base.T, cmap="gray", origin="lower")
    axes[0].set_title("image")
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(base.T, cmap="gray", origin="lower")
        shown = ax.imshow(_middle(m).numpy().T, cmap="inferno", alpha=0.55, origin="lower", vmin=0.0,
                          vmax=max(float(m.max()), 1e-6))
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
