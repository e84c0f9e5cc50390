"""carefl.data: the synthetic consortium and the real-data loaders, through load_hospital."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from carefl.config import compose_config
from carefl.data import HospitalData, load_hospital
from carefl.data.synthetic import SITES, site_profile
from carefl.errors import ConfigError, DataError

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL = ["data.image_size=32", "data.image_size_3d=16", "data.n_train=16", "data.n_test=8"]


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("config", overrides=list(overrides))


def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# ---------------------------------------------------------------- synthetic consortium


@pytest.mark.parametrize(
    "task, spatial",
    [("seg2d", (32, 32)), ("seg3d", (16, 16, 16)), ("cls2d", (32, 32)), ("cls3d", (16, 16, 16))],
)
def test_synthetic_items_have_the_contract_shapes_and_dtypes(task, spatial):
    cfg = make_cfg(f"task={task}", *SMALL)
    hd = load_hospital(cfg, "st-mary", 0)
    assert isinstance(hd, HospitalData) and hd.name == "st-mary"
    assert len(hd.train) == 16 and len(hd.test) == 8
    for ds in (hd.train, hd.test):
        image, label = ds[0]
        assert image.dtype == torch.float32 and image.shape == (1, *spatial)
        _, labels = tensors(ds)
        if task.startswith("seg"):
            assert label.dtype == torch.float32 and label.shape == (1, *spatial)
            assert set(labels.unique().tolist()) == {0.0, 1.0}
            assert (labels.flatten(1).sum(1) > 0).all()  # every segmentation image has a lesion
        else:
            assert label.dtype == torch.int64 and label.shape == ()
            assert set(labels.unique().tolist()) <= {0, 1}


def test_synthetic_accepts_a_plain_dict_config():
    cfg = make_cfg(*SMALL)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert torch.equal(load_hospital(plain, "x", 1).train[3][0], load_hospital(cfg, "x", 1).train[3][0])


def test_synthetic_is_deterministic_from_seed_and_index():
    from carefl.data.synthetic import _generate

    a = tensors(load_hospital(make_cfg(*SMALL), "st-mary", 0).train)
    _generate.cache_clear()  # regenerate rather than hit the in-process cache
    b = tensors(load_hospital(make_cfg(*SMALL), "st-mary", 0).train)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_seed = tensors(load_hospital(make_cfg("seed=1", *SMALL), "st-mary", 0).train)
    assert not torch.equal(a[0], other_seed[0])


def test_synthetic_data_is_cached_in_process():
    cfg = make_cfg(*SMALL)
    first, second = load_hospital(cfg, "st-mary", 0), load_hospital(cfg, "st-mary", 0)
    assert first.train.cache is second.train.cache and first.test.cache is second.test.cache


def lesion_contrast(images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean intensity inside lesions minus mean of the rest of the organ (>0: bright lesions)."""
    organ = images > 0.05 * images.max()
    inside = images[masks.bool()].mean()
    outside = images[organ & ~masks.bool()].mean()
    return float(inside - outside)


def scanned(index: int, side: int, n_train: int, **mix) -> tuple[torch.Tensor, torch.Tensor]:
    """Site ``index``'s training images as its scanner renders them (seed 0), before the preset
    (png2d scales every image to [0, 1], which takes out the scanner's gain and offset)."""
    from carefl.data.synthetic import _generate

    return _generate(index, 0, "segmentation", 2, side, n_train, 8, mix.get("alpha"), mix.get("sites", 10))[0]


def test_default_sites_differ_in_contrast_sizes_and_appearance():
    cfg = make_cfg("data.image_size=32", "data.n_train=40", "data.n_test=8")
    sites = [load_hospital(cfg, h, i) for i, h in enumerate(cfg.federation.hospitals)]
    contrasts = [lesion_contrast(*sites[i].train.tensors) for i in range(3)]
    assert all(c > 0 for c in contrasts)  # one sequence: lesions brighter than tissue everywhere
    raw = [scanned(i, 32, 40) for i in range(3)]
    means = [float(x.mean()) for x, _ in raw]
    assert means[1] > 1.5 * means[0]  # riverside: strong scanner gain ...
    raw_contrasts = [lesion_contrast(*r) for r in raw]
    assert raw_contrasts[1] / means[1] < 0.6 * raw_contrasts[0] / means[0]  # ... and low relative contrast
    assert contrasts[1] < 0.95 * contrasts[0]  # after the [0, 1] scaling still lower, though closer
    assert [len(s.train) for s in sites] == [40, 50, 30]  # size_scale 1.0, 1.25, 0.75
    assert all(len(s.test) == 8 for s in sites)
    stds = [float(s.train.tensors[0].std()) for s in sites]
    assert len({round(s, 3) for s in stds}) == 3
    lesion_fraction = [float(s.train.tensors[1].mean()) for s in sites]
    assert len({round(f, 3) for f in lesion_fraction}) == 3


def test_classification_balance_differs_between_sites():
    cfg = make_cfg("task=cls2d", "data.image_size=16", "data.n_train=200", "data.n_test=8")
    positives = [float(load_hospital(cfg, h, i).train.tensors[1].float().mean()) for i, h in enumerate("abc")]
    assert positives[1] < positives[0] < positives[2]  # riverside 30 %, st-mary 50 %, northfield 70 %
    assert all(abs(p - s.positive) < 0.1 for p, s in zip(positives, SITES))


def test_procedural_sites_are_stable_and_distinct():
    assert site_profile(42) == site_profile(42)
    profiles = {site_profile(i) for i in range(3, 100)}
    assert len(profiles) == 97
    assert {p.polarity for p in profiles} == {1.0}  # same sequence everywhere
    assert len({p.gain for p in profiles}) == 97 and len({p.contrast for p in profiles}) == 97
    cfg = make_cfg(*SMALL)
    a, b = load_hospital(cfg, "h7", 7), load_hospital(cfg, "h8", 8)
    assert not torch.equal(a.train.tensors[0][: len(b.train)].mean((1, 2, 3)), b.train.tensors[0][: len(a.train)].mean((1, 2, 3)))


def test_site_mix_alpha_dials_scanner_heterogeneity_between_hospitals():
    """Dirichlet(alpha) scanner mixes: alpha=100 makes riverside and st-mary the same even mix
    of the 3 scanners (their mean intensities meet); null keeps each on its own scanner."""
    def mean_gap(alpha=None):  # of the scanned images: the preset's scaling takes out the gain
        a, b = (float(scanned(i, 16, 200, alpha=alpha, sites=3)[0].mean()) for i in (0, 1))
        return abs(a - b) / max(a, b)

    own, mixed = mean_gap(), mean_gap(100.0)
    assert own > 0.3 and mixed < 0.1, (own, mixed)
    cfg = make_cfg(*SMALL, "data.site_mix_alpha=0.5")
    first, again = load_hospital(cfg, "a", 4), load_hospital(cfg, "a", 4)
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    assert len(first.train) == round(16 * site_profile(4).size_scale) and len(first.test) == 8
    for bad in ("data.site_mix_alpha=0", "data.site_mix_alpha=-1", "data.site_mix_sites=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            compose_config([bad])


@pytest.mark.parametrize(
    "override, key",
    [("task.in_channels=3", "task.in_channels"), ("data.name=bogus", "data.name"), ("data.n_train=0", "data.n_train")],
)
def test_synthetic_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_hospital(make_cfg(*SMALL, override), "st-mary", 0)


# ---------------------------------------------------------------- Decathlon datalists


def write_nifti(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path.name


def write_png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path.name


def write_datalist(directory: Path, training: list, test: list | None = None, name: str = "datalist.json") -> str:
    content = {"training": training} | ({"test": test} if test is not None else {})
    (directory / name).write_text(json.dumps(content))
    return str(directory / name)


def seg_pairs(directory: Path, n: int, shape: tuple[int, ...], writer=write_nifti, ext=".nii.gz") -> list[dict]:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        image = rng.uniform(0, 200, shape).astype(np.float32)
        label = np.zeros(shape, np.float32)
        label[tuple(slice(2, 6) for _ in shape)] = 2  # binarised to 1
        entries.append({"image": writer(directory / f"img{i}{ext}", image), "label": writer(directory / f"lbl{i}{ext}", label)})
    return entries


DECATHLON_2D = ["data=decathlon", "data.spatial_size=[16,16]"]


def test_decathlon_nifti_2d_without_test_list_splits_off_test_fraction(tmp_path):
    datalist = write_datalist(tmp_path, seg_pairs(tmp_path, 4, (20, 24)))
    hd = load_hospital(make_cfg(*DECATHLON_2D), "st-mary", 0, data_path=datalist)
    assert (len(hd.train), len(hd.test)) == (3, 1)  # round(0.25 * 4) = 1 test entry
    image, label = hd.train[0]  # one training patch of data.spatial_size
    assert image.dtype == torch.float32 and image.shape == (1, 16, 16)
    assert label.dtype == torch.float32 and label.shape == (1, 16, 16)
    image, label = hd.test[0]  # the whole image at native size, scaled to [0, 1] by the png2d preset
    assert image.shape == label.shape == (1, 20, 24) and hd.window.roi_size == (16, 16)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert set(label.unique().tolist()) == {0.0, 1.0}  # the one foreground value 2 is binary foreground


def test_decathlon_nifti_3d_from_the_config_map(tmp_path):
    datalist = write_datalist(tmp_path, seg_pairs(tmp_path, 2, (12, 12, 10)), test=seg_pairs(tmp_path, 1, (12, 12, 10)))
    cfg = make_cfg("task=seg3d", "data=decathlon", "data.spatial_size=[8,8,8]", f"+data.datalists.st-mary={datalist}")
    hd = load_hospital(cfg, "st-mary", 0)
    assert (len(hd.train), len(hd.test)) == (2, 1)
    assert hd.train[0][0].shape == (1, 8, 8, 8) and hd.test[0][1].shape == (1, 12, 12, 10)


def test_decathlon_png_segmentation_and_classification(tmp_path):
    entries = seg_pairs(tmp_path, 3, (20, 20), writer=write_png, ext=".png")
    hd = load_hospital(make_cfg(*DECATHLON_2D), "riverside", 1, data_path=write_datalist(tmp_path, entries))
    assert hd.train[0][0].shape == (1, 16, 16) and set(hd.test[0][1].unique().tolist()) == {0.0, 1.0}
    cls_entries = [{"image": e["image"], "label": i % 2} for i, e in enumerate(entries)]
    datalist = write_datalist(tmp_path, cls_entries, test=cls_entries[:1], name="cls.json")
    hd = load_hospital(make_cfg("task=cls2d", *DECATHLON_2D), "riverside", 1, data_path=datalist)
    assert [int(hd.train[i][1]) for i in range(3)] == [0, 1, 0]
    assert hd.train[0][1].dtype == torch.int64 and hd.train[0][1].shape == ()


# ---------------------------------------------------------------- MedMNIST npz


def write_npz(path: Path, train_shape: tuple[int, ...], test_shape: tuple[int, ...], **extra) -> str:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, train_shape, dtype=np.uint8),
        "train_labels": rng.integers(0, 2, (train_shape[0], 1)),
        "test_images": rng.integers(0, 256, test_shape, dtype=np.uint8),
        "test_labels": rng.integers(0, 2, (test_shape[0],)),
    } | extra
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "task, channels, train_shape, item_shape",
    [
        ("cls2d", 1, (6, 28, 28), (1, 28, 28)),
        ("cls2d", 3, (6, 28, 28, 3), (3, 28, 28)),
        ("cls3d", 1, (6, 8, 10, 12), (1, 8, 10, 12)),
    ],
)
def test_medmnist_npz_loads_2d_rgb_and_3d(tmp_path, task, channels, train_shape, item_shape):
    path = write_npz(tmp_path / "site.npz", train_shape, (4, *train_shape[1:]))
    cfg = make_cfg(f"task={task}", f"task.in_channels={channels}", "data=medmnist", f"+data.files.northfield={path}")
    hd = load_hospital(cfg, "northfield", 2)
    assert (len(hd.train), len(hd.test)) == (6, 4)
    image, label = hd.train[0]
    assert image.dtype == torch.float32 and image.shape == item_shape and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and label.shape == ()


def test_medmnist_val_split_joins_training_and_reload_follows_the_file(tmp_path):
    path = tmp_path / "site.npz"
    write_npz(path, (6, 8, 8), (4, 8, 8))
    cfg = make_cfg("task=cls2d", "data=medmnist")
    assert len(load_hospital(cfg, "h", 0, data_path=str(path)).train) == 6
    write_npz(path, (6, 8, 8), (4, 8, 8), val_images=np.zeros((3, 8, 8), np.uint8), val_labels=np.ones((3, 1), int))
    assert len(load_hospital(cfg, "h", 0, data_path=str(path)).train) == 9


# ---------------------------------------------------------------- bad data: one DataError each


def assert_data_error(cfg, hospital: str, data_path: str | None, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        load_hospital(cfg, hospital, 0, data_path=data_path)
    message = str(info.value)
    assert hospital in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_files_are_named(tmp_path):
    assert_data_error(make_cfg(*DECATHLON_2D), "st-mary", str(tmp_path / "nope.json"), "nope.json", "does not exist")
    assert_data_error(make_cfg("task=cls2d", "data=medmnist"), "st-mary", str(tmp_path / "nope.npz"), "nope.npz")


def test_no_data_configured_names_the_keys_to_set():
    assert_data_error(make_cfg(*DECATHLON_2D), "st-mary", None, "data.datalists.st-mary", "data-path")
    assert_data_error(make_cfg("task=cls2d", "data=medmnist"), "st-mary", None, "data.files.st-mary", "data-path")


def test_unreadable_image_is_named(tmp_path):
    entries = seg_pairs(tmp_path, 3, (20, 20))
    (tmp_path / "img1.nii.gz").write_bytes(b"this is not a nifti file")
    datalist = write_datalist(tmp_path, entries)
    assert_data_error(make_cfg(*DECATHLON_2D), "northfield", datalist, "img1.nii.gz", "no reader could open it", "datalist.json")


def test_image_label_shape_mismatch_is_named(tmp_path):
    entries = seg_pairs(tmp_path, 3, (20, 20))
    write_nifti(tmp_path / "lbl2.nii.gz", np.zeros((20, 18), np.float32))
    datalist = write_datalist(tmp_path, entries)
    assert_data_error(make_cfg(*DECATHLON_2D), "northfield", datalist, "lbl2.nii.gz", "img2.nii.gz", "not on the grid")


def test_empty_splits_are_named(tmp_path):
    datalist = write_datalist(tmp_path, [])
    assert_data_error(make_cfg(*DECATHLON_2D), "riverside", datalist, "datalist.json", "'training' list is empty")
    npz = write_npz(tmp_path / "empty.npz", (4, 8, 8), (0, 8, 8))
    assert_data_error(make_cfg("task=cls2d", "data=medmnist"), "riverside", npz, "empty.npz", "test split is empty")


def test_wrong_npz_keys_list_found_and_expected(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, x_train=np.zeros((2, 8, 8)), y_train=np.zeros(2))
    message = assert_data_error(make_cfg("task=cls2d", "data=medmnist"), "riverside", str(path), "wrong.npz")
    assert "['x_train', 'y_train']" in message and "train_images" in message and "test_labels" in message


def test_path_traversal_is_rejected_with_the_entry_named(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    entries = seg_pairs(tmp_path, 2, (20, 20))  # written outside the datalist's directory
    entries[1] = {"image": "../" + entries[1]["image"], "label": "../" + entries[1]["label"]}
    datalist = write_datalist(site, seg_pairs(site, 1, (20, 20)) + [entries[1]])
    assert_data_error(make_cfg(*DECATHLON_2D), "st-mary", datalist, "training[1]", "outside", "img1.nii.gz")


def test_synthetic_images_go_through_the_presets_steps_and_augmentation(monkeypatch):
    """The synthetic consortium takes the real-data path: a preset whose steps map every image
    into [10, 11] and whose augmentation always adds 5 shows in the loaded records and batches."""
    import carefl.data.synthetic as synthetic
    from carefl.data.presets import load_preset
    from carefl.training import make_loader

    real = load_preset("png2d")
    spec = {**real.spec,
            "steps": [{"_target_": "monai.transforms.ScaleIntensityd", "keys": ["image"], "minv": 10.0, "maxv": 11.0}],
            "augment": [{"_target_": "monai.transforms.RandShiftIntensityd", "keys": ["image"], "offsets": [5.0, 5.0],
                         "prob": 1.0}]}
    monkeypatch.setattr(synthetic, "load_preset", lambda name, digest=None: type(real)(name, spec, "f" * 64))
    hd = load_hospital(make_cfg(*SMALL), "st-mary", 0)
    images, masks = hd.train.tensors  # prepared records: the preset's steps ran once per image
    assert images.amin(dim=(1, 2, 3)).allclose(torch.tensor(10.0)) and images.amax(dim=(1, 2, 3)).allclose(torch.tensor(11.0))
    x, y = next(iter(make_loader(hd.train, 8, 0)))  # training batches: the preset's augmentation
    assert x.min() >= 15.0 - 1e-4 and x.max() <= 16.0 + 1e-4 and set(y.unique().tolist()) == {0.0, 1.0}
    test_x, _ = hd.test[0]  # the test split is never augmented
    assert 10.0 - 1e-4 <= test_x.min() and test_x.max() <= 11.0 + 1e-4
    _, labels = tensors(load_hospital(make_cfg("task=cls2d", *SMALL), "st-mary", 0).test)
    assert labels.dtype == torch.int64
