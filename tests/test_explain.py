"""Explanation maps: finite, in range, and they point at the lesion a model actually uses."""

import warnings

import pytest
import torch
from torch import nn

from carefl.data.decathlon import SlidingWindow
from carefl.explain import classification_maps, last_conv, save_overlay, segmentation_maps

warnings.filterwarnings("ignore")


class BrightSpot(nn.Module):
    """Class 1's logit grows with the amount of bright (> 0.5) tissue: the lesion is its evidence."""

    def __init__(self, dims: int):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
        self.conv = conv(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3 ** dims)
            self.conv.bias.fill_(-0.5)
        self.act, self.pool, self.fc = nn.ReLU(), pool(1), nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def lesion_image(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = 0.1 + 0.05 * torch.rand((1, *shape), generator=gen)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(s // 3, s // 3 + max(2, s // 5)) for s in shape)] = True
    image[0][mask] = 1.0
    return image, mask


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 12)])
def test_classification_maps_point_at_the_lesion(shape):
    image, mask = lesion_image(shape)
    maps = classification_maps(BrightSpot(len(shape)), image, target=1)
    assert set(maps) == {"occlusion", "gradcam"}
    for name, m in maps.items():
        assert m.shape == shape and torch.isfinite(m).all() and 0 <= m.min() and m.max() <= 1, name
        # better than chance: the lesion (a few % of the image) holds far more of the map
        assert m[mask].mean() > 3 * m[~mask].mean(), (name, m[mask].mean(), m[~mask].mean())


def test_segmentation_probability_localises_and_uncertainty_is_a_variance():
    image, mask = lesion_image((40, 36))
    window = SlidingWindow((16, 16), 0.25, 4)

    class Threshold(nn.Module):  # flip-equivariant: every flip agrees, so no uncertainty
        def forward(self, x):
            return (x - 0.5) * 10

    maps = segmentation_maps(Threshold(), image, window, num_classes=1)
    assert maps["probability"][mask].mean() > 0.9 and maps["probability"][~mask].mean() < 0.1
    assert torch.allclose(maps["uncertainty"], torch.zeros(40, 36), atol=1e-6)

    shifted = nn.Conv2d(1, 1, 3, padding=1, bias=False)  # looks one pixel to the side: flips disagree
    with torch.no_grad():
        shifted.weight.zero_()
        shifted.weight[0, 0, 1, 2] = 10.0
    maps = segmentation_maps(nn.Sequential(shifted, nn.Identity()), image - 0.5, window, num_classes=1)
    u = maps["uncertainty"]
    assert torch.isfinite(u).all() and u.min() >= 0 and u.max() <= 0.25 and u.max() > 0.01
    edge = mask ^ torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool()
    assert u[edge | mask].mean() > u[~(edge | mask)].mean()  # unsure at the lesion, not in the background


def test_multiclass_maps_and_the_overlay_file(tmp_path):
    image, _ = lesion_image((24, 24))

    class ThreeClass(nn.Module):
        def forward(self, x):
            return torch.cat([-(x - c * 0.45) ** 2 * 20 for c in range(3)], dim=1)

    maps = segmentation_maps(ThreeClass(), image, SlidingWindow((8, 8), 0.5, 8), num_classes=3)
    assert all(torch.isfinite(m).all() for m in maps.values())
    path = save_overlay(image, maps, tmp_path / "x.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert last_conv(BrightSpot(2)) == "conv"
