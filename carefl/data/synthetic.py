"""A generated hospital consortium: lesion images whose appearance depends on the site.

Every image is a slice (2D, ``image_size`` x ``image_size``) or volume (3D, ``image_size_3d``
cubed) of an elliptical organ with smooth tissue texture, in which irregular lesions (each the
union of three overlapping ellipsoids) are placed. Segmentation targets are the lesion masks
(every image has at least one lesion); classification targets are "lesion present" (1, one
lesion at 70 % of the site's radius) / "absent" (0). Each hospital renders its
patients through its own *site profile* -- the scanner and population of that hospital:

====  ==========  =========================================================================
idx   hospital    site profile
====  ==========  =========================================================================
0     st-mary     1.5 T FLAIR-like: bright, solid, medium lesions (2-4 per image) on
                  mid-grey tissue; mild bias field, light blur, low noise. 50 % positives
                  (classification), 1.0 x ``n_train``.
1     riverside   3 T scanner, different vendor: strong intensity gain, low lesion/tissue
                  contrast, small lesions (3-5), sharp but noisy, textured tissue.
                  30 % positives, 1.25 x ``n_train``.
2     northfield  older scanner, post-contrast: *rim-enhancing* lesions (bright ring, core
                  only faintly enhanced), smaller and many (3-5), strong bias field, blur,
                  low gain with an offset. 70 % positives, 0.75 x ``n_train``.
>=3   (any)       procedurally drawn from the hospital index alone (same site for every
                  ``seed``): rim or solid, contrast, noise, blur, bias field,
                  lesion size/count, class balance and dataset size within the ranges above.
====  ==========  =========================================================================

All sites image the same task with the same kind of sequence (lesions brighter than tissue):
what differs is what differs between real scanners and populations -- gain and offset,
contrast, noise, blur, bias field, lesion size/count/shape, prevalence and dataset size. A
model trained on one of the first three sites alone transfers badly to the other two
(its intensity thresholds and lesion-size prior do not carry over); a model trained on the
pooled data, or federated, learns all three. (``polarity=-1`` is kept as a profile option for
experiments with a different sequence at one site.)
Measured numbers are in ``benchmarks/synthetic_sites.py``.

Heterogeneity (``data.site_mix_alpha``): by default hospital i images all its patients on its
own scanner (profile i), the most heterogeneous consortium. To dial heterogeneity, set
``data.site_mix_alpha``: each hospital then draws its scanner mix ``pi ~ Dirichlet(alpha * 1_K)``
over the first K = ``data.site_mix_sites`` profiles and renders ``Multinomial(n, pi)`` of its
images with each -- the segmentation analogue of the Dirichlet label skew of
``carefl.data.partition`` (a mask has no single class to split): ``alpha = 100`` makes every
hospital the same even mix of K scanners (nearly i.i.d.), ``alpha = 0.1`` gives each hospital
mostly one (random) scanner. The hospital's own size scale still sets how many images it has.

Preprocessing (``data.preprocess``, default ``png2d``): the rendered images are what each site's
scanner produces; they then take the real-data path (:func:`load_synthetic`): the preset's
``steps`` once per image (png2d scales each image to [0, 1], which takes out the scanner's gain
and offset as it would for a real hospital's PNGs; contrast, noise, blur, bias field and lesions
still differ by site), its ``augment`` on every training batch.

The images themselves are drawn from ``(seed, index, split)``: same config -> bitwise identical
tensors. Generation is vectorised over images (seg2d, all three default sites: ~0.2 s; seg3d ~1.5 s) and
cached in-process, because Flower re-creates the ClientApp every round in the same process.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth, RandBiasField
from monai.utils import convert_to_tensor
from carefl.data.cache import DiskCache
from carefl.data.decathlon import Patches, Records, _plain
from carefl.data.presets import build_transforms, load_preset
from carefl.errors import ConfigError

_SUBBLOBS = 3  # ellipsoids per lesion (their union makes the lesion irregular)
_CLS_RADIUS = 0.7  # classification lesions are 70 % of the site's segmentation lesion radius
_RIM_CORE = 0.6  # rim lesions: the core is the inner 60 % of the lesion radius


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's scanner and population render a patient.

    Intensities are in arbitrary units before ``gain``/``offset`` (tissue ~ ``tissue``).
    Radii are fractions of the half side of the image (1.0 = half the image).
    """

    polarity: float  # +1 lesions brighter than tissue, -1 darker (other MR sequence)
    core: float  # lesion core intensity relative to its rim (1 = solid, < 1 = rim-enhancing)
    tissue: float  # base tissue intensity inside the organ
    contrast: float  # |lesion - tissue| intensity
    texture: float  # relative amplitude of the smooth tissue texture
    noise: float  # std of additive Gaussian noise (after gain)
    blur: float  # Gaussian blur sigma in voxels (0 = none)
    bias: float  # RandBiasField coefficient range (-bias, bias), degree 3
    radius: tuple[float, float]  # lesion radius range
    count: tuple[int, int]  # lesions per (positive) image, inclusive
    positive: float  # fraction of lesion-present images (classification)
    size_scale: float  # training-set size = round(n_train * size_scale)
    gain: float  # scanner intensity gain
    offset: float  # scanner intensity offset


SITES: tuple[SiteProfile, ...] = (
    SiteProfile(  # st-mary
        polarity=1.0, core=1.0, tissue=0.4, contrast=0.45, texture=0.08, noise=0.03,
        blur=0.6, bias=0.1, radius=(0.3, 0.45), count=(2, 4), positive=0.5,
        size_scale=1.0, gain=1.0, offset=0.0,
    ),
    SiteProfile(  # riverside
        polarity=1.0, core=1.0, tissue=0.6, contrast=0.25, texture=0.12, noise=0.06,
        blur=0.0, bias=0.15, radius=(0.22, 0.34), count=(3, 5), positive=0.3,
        size_scale=1.25, gain=1.6, offset=0.0,
    ),
    SiteProfile(  # northfield
        polarity=1.0, core=0.35, tissue=0.3, contrast=0.6, texture=0.05, noise=0.03,
        blur=0.7, bias=0.25, radius=(0.26, 0.38), count=(3, 5), positive=0.7,
        size_scale=0.75, gain=0.6, offset=0.1,
    ),
)


def site_profile(index: int) -> SiteProfile:
    """The profile of the hospital at position ``index`` of ``federation.hospitals``.

    Indices 0-2 are the hand-designed sites of the module docstring; larger indices are drawn
    from a generator seeded by the index only, so hospital 17 is the same site in every run.
    """
    if index < 0:
        raise ConfigError(f"hospital index {index} is negative; use its position in federation.hospitals")
    if index < len(SITES):
        return SITES[index]
    rng = np.random.default_rng([index, 0x5173])
    r_lo = rng.uniform(0.26, 0.32)
    c_lo = int(rng.integers(2, 4))
    return SiteProfile(
        polarity=1.0,
        core=float(rng.choice([1.0, 1.0, rng.uniform(0.2, 0.5)])),
        tissue=float(rng.uniform(0.3, 0.7)),
        contrast=float(rng.uniform(0.4, 0.6)),
        texture=float(rng.uniform(0.05, 0.1)),
        noise=float(rng.uniform(0.03, 0.05)),
        blur=float(rng.choice([0.0, rng.uniform(0.5, 0.7)])),
        bias=float(rng.uniform(0.05, 0.25)),
        radius=(float(r_lo), float(r_lo + rng.uniform(0.12, 0.16))),
        count=(c_lo, c_lo + int(rng.integers(0, 3))),
        positive=float(rng.uniform(0.3, 0.7)),
        size_scale=float(rng.uniform(0.5, 1.5)),
        gain=float(rng.uniform(0.6, 1.6)),
        offset=float(rng.uniform(0.0, 0.1)),
    )


def _render(
    site: SiteProfile, n: int, spatial_dims: int, side: int, classification: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` patients of ``site``.

    Returns ``images`` float32 (n, 1, *spatial) and either ``masks`` float32 (n, 1, *spatial)
    in {0, 1} (segmentation) or ``labels`` int64 (n,) in {0, 1} (classification).
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    spatial = (side,) * spatial_dims
    axes = torch.linspace(-1.0, 1.0, side)
    grid = torch.stack(torch.meshgrid(*([axes] * spatial_dims), indexing="ij"))  # (dims, *spatial)
    grid = grid.unsqueeze(1)  # (dims, 1, *spatial), broadcasts against per-image (dims, n, 1...)
    per_image = (spatial_dims, n) + (1,) * spatial_dims

    def rho(center: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """Squared normalised ellipsoid radius (n, *spatial): < 1 inside."""
        return ((grid - center) / radii).square().sum(0)

    organ = rho(uniform(-0.08, 0.08, *per_image), uniform(0.78, 0.92, *per_image)) < 1.0
    texture = F.interpolate(
        torch.randn(n, 1, *((6,) * spatial_dims), generator=gen),
        size=spatial, mode="bilinear" if spatial_dims == 2 else "trilinear", align_corners=False,
    )[:, 0]
    image = organ * site.tissue * (1.0 + site.texture * texture)

    # Lesions: per image a count; each lesion the union of _SUBBLOBS ellipsoids near its centre.
    # Classification: one smaller lesion or none, so "is there a lesion?" is not trivial.
    labels = (torch.rand(n, generator=gen) < site.positive).long()
    max_count = 1 if classification else site.count[1]
    counts = labels if classification else torch.randint(site.count[0], max_count + 1, (n,), generator=gen)
    lesion_rho = torch.full((n, *spatial), float("inf"))
    strength = torch.zeros(n, *spatial)
    for k in range(max_count):
        radius = uniform(*site.radius, n) * (_CLS_RADIUS if classification else 1.0)
        center = uniform(-0.45, 0.45, *per_image)
        blob_rho = torch.full((n, *spatial), float("inf"))
        for _ in range(_SUBBLOBS):
            offset = radius.view(1, n, *(1,) * spatial_dims) * uniform(-0.5, 0.5, *per_image)
            axes_r = radius.view(1, n, *(1,) * spatial_dims) * uniform(0.55, 1.0, *per_image)
            blob_rho = torch.minimum(blob_rho, rho(center + offset, axes_r))
        present = (k < counts).view(n, *(1,) * spatial_dims)
        blob_rho = torch.where(present, blob_rho, torch.full_like(blob_rho, float("inf")))
        closer = blob_rho < lesion_rho
        strength = torch.where(closer, uniform(0.75, 1.25, n).view(n, *(1,) * spatial_dims), strength)
        lesion_rho = torch.minimum(lesion_rho, blob_rho)
    mask = lesion_rho < 1.0
    profile = torch.where(lesion_rho < _RIM_CORE**2, site.core, 1.0) * mask
    image = image + site.polarity * site.contrast * strength * profile

    if site.bias > 0:
        bias_field = RandBiasField(degree=3, coeff_range=(-site.bias, site.bias), prob=1.0)
        bias_field.set_random_state(seed=seed % 2**32)
        image = torch.stack([convert_to_tensor(bias_field(img[None]), track_meta=False)[0] for img in image])
    if site.blur > 0:
        image = convert_to_tensor(GaussianSmooth(sigma=site.blur)(image), track_meta=False)  # n as channels
    image = site.gain * image + site.offset + site.noise * torch.randn(image.shape, generator=gen)
    image = image.float().unsqueeze(1)
    if classification:
        return image, labels
    return image, mask.float().unsqueeze(1)


@functools.lru_cache(maxsize=256)
def _generate(
    index: int, seed: int, kind: str, spatial_dims: int, side: int, n_train: int, n_test: int,
    mix_alpha: float | None, mix_sites: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Cached (train, test) tensors of one hospital; see :func:`_render` for shapes.

    ``mix_alpha`` None: every image is rendered with the hospital's own profile. Otherwise the
    hospital draws scanner shares ``pi ~ Dirichlet(mix_alpha * 1_K)`` over the profiles of
    sites ``0..mix_sites-1`` (K = ``mix_sites``) and each split's images are split among them
    by ``Multinomial(n, pi)`` (train and test with the same ``pi``).
    """
    train_seed, test_seed = (
        int(s) for s in np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)
    )
    n_site = max(1, round(n_train * site_profile(index).size_scale))
    classification = kind == "classification"
    if mix_alpha is None:
        site = site_profile(index)
        return (
            _render(site, n_site, spatial_dims, side, classification, train_seed),
            _render(site, n_test, spatial_dims, side, classification, test_seed),
        )
    rng = np.random.default_rng([seed, index, 0x313C])
    shares = rng.dirichlet(np.full(mix_sites, float(mix_alpha)))

    def mixed(n: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = rng.multinomial(n, shares)
        parts = [
            _render(site_profile(k), int(c), spatial_dims, side, classification, split_seed + k)
            for k, c in enumerate(counts) if c
        ]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    return mixed(n_site, train_seed % 2**62), mixed(n_test, test_seed % 2**62)


def load_synthetic(data: dict, task: dict, seed: int, index: int) -> tuple[Records, Records]:
    """(train, test) datasets of the synthetic hospital at ``index``, through the real-data path.

    The generated images are records like a datalist's: the preset's ``steps``
    (``data.preprocess``, default ``png2d``) run once per image and are kept in a
    :class:`~carefl.data.cache.DiskCache` (in memory); training draws go through
    :class:`~carefl.data.decathlon.Patches` (segmentation: the patch is the whole image) or
    :class:`~carefl.data.decathlon.Records` (classification), whose loader applies the preset's
    ``augment`` to each batch; the test split is not augmented.

    Args:
        data: ``cfg.data`` (image_size, image_size_3d, n_train, n_test, preprocess and the
            request's preprocess_digest; optional site_mix_alpha, site_mix_sites: scanner
            mixing, see "Heterogeneity" above).
        task: ``cfg.task`` (kind, spatial_dims, in_channels, num_classes).
        seed: ``cfg.seed``.
        index: the hospital's position in ``federation.hospitals``.

    Items are ``(image float32 (1, *spatial), label)`` with label float32 (1, *spatial) in
    {0, 1} for segmentation (the class index when task.num_classes=2) or int64 () in {0, 1}
    for classification.
    """
    kind, dims = task["kind"], int(task["spatial_dims"])
    if kind not in ("segmentation", "classification"):
        raise ConfigError(f"task.kind={kind!r}; use segmentation or classification")
    if dims not in (2, 3):
        raise ConfigError(f"task.spatial_dims={dims}; the synthetic data is 2 or 3 dimensional")
    if int(task["in_channels"]) != 1:
        raise ConfigError(f"task.in_channels={task['in_channels']}; synthetic images have 1 channel, set it to 1")
    if kind == "classification" and int(task["num_classes"]) != 2:
        raise ConfigError(
            f"task.num_classes={task['num_classes']}; synthetic classification is lesion present/absent, set it to 2"
        )
    if kind == "segmentation" and int(task["num_classes"]) > 2:
        raise ConfigError(
            f"task.num_classes={task['num_classes']}; synthetic masks have one foreground class, so use 1 (sigmoid) "
            "or 2 (softmax); multi-class segmentation needs data=decathlon with label maps"
        )
    side_key = "image_size" if dims == 2 else "image_size_3d"
    for key in (side_key, "n_train", "n_test"):
        if int(data[key]) < (8 if key == side_key else 1):
            raise ConfigError(f"data.{key}={data[key]} is too small; use at least {8 if key == side_key else 1}")
    alpha = data.get("site_mix_alpha")
    preset = load_preset(data.get("preprocess", "png2d"), data.get("preprocess_digest"))
    train, test = _prepared(
        index, int(seed), kind, dims, int(data[side_key]), int(data["n_train"]), int(data["n_test"]),
        None if alpha is None else float(alpha), int(data.get("site_mix_sites", 10)), preset.name, preset.digest,
    )
    _, augment = build_transforms(preset)
    if kind == "segmentation":  # the real-data path: one patch per draw (here the whole image)
        side = int(data[side_key])
        return Patches(train, (side,) * dims, preset.spec["crop_pos"], preset.spec["crop_neg"], augment), \
            Records(test, None)
    return Records(train, augment), Records(test, None)


@functools.lru_cache(maxsize=256)
def _prepared(index: int, seed: int, kind: str, dims: int, side: int, n_train: int, n_test: int,
              mix_alpha: float | None, mix_sites: int, preset_name: str, digest: str) -> tuple[DiskCache, DiskCache]:
    """The generated images after the preset's ``steps``, as the real-data path keeps them
    (:class:`carefl.data.cache.DiskCache` in memory), once per process."""
    splits = _generate(index, seed, kind, dims, side, n_train, n_test, mix_alpha, mix_sites)
    preset = load_preset(preset_name, digest)
    steps, _ = build_transforms(preset)
    config_key = json.dumps(["synthetic", preset.digest, index, seed, kind, dims, side, n_train, n_test,
                             mix_alpha, mix_sites])
    caches = []
    for split, (images, labels) in zip(("train", "test"), splits):
        def prepare(record: dict, images=images, labels=labels) -> tuple[dict, dict]:
            i = record["label"]
            item = {"image": images[i]}
            item.update({"class": int(labels[i])} if kind == "classification" else {"label": labels[i]})
            item = steps(item)
            out = {"image": _plain(item["image"])}
            out.update({"class": int(item["class"])} if kind == "classification" else {"label": _plain(item["label"])})
            return out, {}

        records = [{"name": f"{split}[{i}]", "image": [], "label": i} for i in range(len(images))]
        caches.append(DiskCache(records, prepare, None, config_key, f"synthetic site {index}"))
    return caches[0], caches[1]
