"""Real clinical files: NIfTI, PNG and DICOM (a file and a series), multi-class and multi-channel,
geometry checks, the disk cache, patch training under DP, sliding-window evaluation, carefl-data.

Every file here is written by the test with the library a hospital's own tools would use
(nibabel, pillow, pydicom), then read back through CareFL's real loader.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage
from omegaconf import OmegaConf
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import carefl.data.decathlon as decathlon
from carefl.config import compose_config
from carefl.data import load_hospital
from carefl.data.check import main as data_check
from carefl.errors import ConfigError, DataError
from carefl.models import build_model
from carefl.tasks import build_loss, compute_metrics, metric_names
from carefl.training import evaluate, make_loader, make_optimizer

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SEG3 = OmegaConf.create({"kind": "segmentation", "loss": "dice_ce", "num_classes": 3})
SMALL_UNET = ["model.channels=[4,8]", "model.strides=[2]"]


def cfg_for(*overrides: str):
    return compose_config(["data=decathlon", *SMALL_UNET, *overrides])


def nifti(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path.name


def png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path.name


def datalist(directory: Path, training: list, test: list | None = None, name: str = "datalist.json") -> str:
    (directory / name).write_text(json.dumps({"training": training} | ({"test": test} if test else {})))
    return str(directory / name)


def blobs(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8 in {0, 1, 2}): a class-1 box holding a class-2 core, + noise."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    centre = [int(rng.integers(s // 3, 2 * s // 3)) for s in shape]
    label[tuple(slice(c - s // 4, c + s // 4) for c, s in zip(centre, shape))] = 1
    label[tuple(slice(c - s // 8, c + s // 8) for c, s in zip(centre, shape))] = 2
    image = (label * 60.0 + rng.normal(0, 10, shape) + 40).astype(np.float32)
    return image, label


def ct_dataset(rows_cols: tuple[int, int], pixels: np.ndarray, uids: tuple[str, str, str], **geometry) -> Dataset:
    """A CT DICOM dataset holding ``pixels`` (int16) with the given study/series/frame UIDs and
    geometry attributes (PixelSpacing, ImagePositionPatient, ...)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "anon"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Rows, ds.Columns = rows_cols
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    for name, value in geometry.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_series(folder: Path, volume: np.ndarray, spacing=(0.8, 0.8), thickness=2.0) -> str:
    """A CT series, one DICOM file per slice (``volume`` int16 ``(slices, rows, cols)``)."""
    folder.mkdir(parents=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    for k, plane in enumerate(volume):
        ds = ct_dataset(plane.shape, plane, uids, InstanceNumber=k + 1, PixelSpacing=list(spacing),
                        SliceThickness=thickness, ImagePositionPatient=[0.0, 0.0, k * thickness])
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder.name


def mask_like(image_file: str, label: np.ndarray, path: Path) -> str:
    """``label`` saved as NIfTI on the voxel grid MONAI reads ``image_file`` on (as a hospital
    exporting its masks from the image's geometry would)."""
    img = LoadImage(image_only=True)(image_file)
    assert tuple(img.shape) == label.shape, (img.shape, label.shape)
    return nifti(path, label, np.asarray(img.affine))


# ---------------------------------------------------------------- multi-class maths


def test_multiclass_dice_per_class_by_hand_and_the_softmax_loss():
    labels = torch.zeros(1, 1, 4, 4)
    labels[0, 0, 0, :2] = 1  # class 1: 2 pixels
    labels[0, 0, 3, :] = 2  # class 2: 4 pixels
    pred = labels.clone()
    pred[0, 0, 0, 2] = 1  # class 1: 2 right + 1 false positive -> 2*2/(3+2) = 0.8
    pred[0, 0, 3, 3] = 0  # class 2: 3 of 4 right -> 2*3/(3+4) = 6/7
    logits = torch.nn.functional.one_hot(pred[:, 0].long(), 3).movedim(-1, 1).float() * 10
    metrics = compute_metrics(SEG3, logits, labels)
    assert metric_names(SEG3) == ("dice", "dice_1", "dice_2", "hd95", "surface_dice") == tuple(metrics)[:5]
    assert metrics["dice_1"] == pytest.approx(0.8) and metrics["dice_2"] == pytest.approx(6 / 7)
    assert metrics["dice"] == pytest.approx((0.8 + 6 / 7) / 2)  # background left out
    logits.requires_grad_(True)
    loss = build_loss(SEG3)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    perfect = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float() * 20
    assert build_loss(SEG3)(perfect, labels) < loss


# ---------------------------------------------------------------- labels and geometry


def test_binary_task_accepts_one_foreground_value_and_refuses_a_multiclass_map(tmp_path):
    image, label = blobs((24, 24), 0)
    entries = [{"image": png(tmp_path / f"i{i}.png", image), "label": png(tmp_path / f"m{i}.png", (label > 0) * 255)}
               for i in range(3)]
    hd = load_hospital(cfg_for(), "h", 0, data_path=datalist(tmp_path, entries))
    assert set(hd.test[0][1].unique().tolist()) == {0.0, 1.0}  # 0/255 is binary
    entries[1]["label"] = png(tmp_path / "multi.png", label)
    with pytest.raises(DataError, match=r"multi.png has values \[0, 1, 2\]: a multi-class map; set task.num_classes=3"):
        load_hospital(cfg_for(), "h", 0, data_path=datalist(tmp_path, entries, name="d2.json"))


def test_labels_outside_the_classes_and_fractional_labels_are_refused(tmp_path):
    image, label = blobs((24, 24), 1)
    bad = label.copy()
    bad[0, 0] = 5
    entries = [{"image": nifti(tmp_path / "i.nii.gz", image), "label": nifti(tmp_path / "l.nii.gz", label)},
               {"image": "i.nii.gz", "label": nifti(tmp_path / "bad.nii.gz", bad.astype(np.float32))}]
    with pytest.raises(DataError, match=r"bad.nii.gz has values \[0, 1, 2, 5\], outside 0..2 for task.num_classes=3"):
        load_hospital(cfg_for("task.num_classes=3"), "h", 0, data_path=datalist(tmp_path, entries))
    entries[1]["label"] = nifti(tmp_path / "frac.nii.gz", label.astype(np.float32) * 0.5)
    with pytest.raises(DataError, match="frac.nii.gz holds non-integer values .* use nearest"):
        load_hospital(cfg_for("task.num_classes=3"), "h", 0, data_path=datalist(tmp_path, entries, name="d2.json"))


def test_a_mask_on_another_grid_is_refused_even_when_the_shapes_match(tmp_path):
    image, label = blobs((20, 20, 20), 2)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(2)]
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # same shape, left-right flipped (LAS vs RAS)
    entries[1]["label"] = nifti(tmp_path / "flipped.nii.gz", label, flipped)
    cfg = cfg_for("task=seg3d", "task.num_classes=3", "data.spatial_size=[8,8,8]")
    with pytest.raises(DataError, match=r"flipped.nii.gz \(shape \(20, 20, 20\).*LAS\) is not on the grid of .*"
                                        r"i1.nii.gz .*RAS\) \(they differ in orientation\)"):
        load_hospital(cfg, "h", 0, data_path=datalist(tmp_path, entries))
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    entries[1]["label"] = nifti(tmp_path / "shifted.nii.gz", label, shifted)
    with pytest.raises(DataError, match="differ in origin"):
        load_hospital(cfg, "h", 0, data_path=datalist(tmp_path, entries, name="d2.json"))


def test_an_image_list_is_stacked_as_channels_on_one_grid(tmp_path):
    image, label = blobs((24, 24), 3)
    entries = [{"image": [nifti(tmp_path / f"t1_{i}.nii.gz", image), nifti(tmp_path / f"t2_{i}.nii.gz", -image)],
                "label": nifti(tmp_path / f"l{i}.nii.gz", label)} for i in range(3)]
    path = datalist(tmp_path, entries)
    hd = load_hospital(cfg_for("task.num_classes=3", "task.in_channels=2"), "h", 0, data_path=path)
    x, _ = hd.test[0]
    assert x.shape == (2, 24, 24) and not torch.equal(x[0], x[1])
    with pytest.raises(DataError, match="has 2 channel.* but task.in_channels=1; set task.in_channels"):
        load_hospital(cfg_for("task.num_classes=3"), "h2", 0, data_path=path)
    entries[0]["image"][1] = nifti(tmp_path / "t2_other.nii.gz", image[:, :20])
    with pytest.raises(DataError, match="t2_other.nii.gz .* is not on the grid of .*t1_0.nii.gz .*differ in shape"):
        load_hospital(cfg_for("task.num_classes=3", "task.in_channels=2"), "h", 0,
                      data_path=datalist(tmp_path, entries, name="d2.json"))


# ---------------------------------------------------------------- DICOM


def test_dicom_file_and_series_load_with_the_headers_geometry(tmp_path):
    # a single-frame DICOM that ships with pydicom, with a NIfTI mask exported on its grid
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    ct_file = tmp_path / "ct.dcm"
    ct_file.write_bytes(Path(ct).read_bytes())
    _, small = blobs((128, 128), 4)
    mask2d = mask_like(str(ct_file), small, tmp_path / "ct_mask.nii.gz")
    # a 12-slice series written with pydicom: 0.8 x 0.8 mm pixels, 2 mm slices
    image, label = blobs((12, 16, 20), 5)
    series = write_series(tmp_path / "series", image.astype(np.int16))
    read = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    assert read.shape[0] == 1 and sorted(read.shape[1:]) == [12, 16, 20]
    spacing = np.linalg.norm(np.asarray(read.affine)[:3, :3], axis=0)
    assert sorted(spacing.round(4).tolist()) == [0.8, 0.8, 2.0]  # from PixelSpacing and the positions
    vol_label = np.asarray(LoadImage(image_only=True)(str(tmp_path / "series"))) * 0  # MONAI's axis order
    vol_label[4:12, 4:10, 4:8] = 1
    vol_label[6:10, 5:8, 5:7] = 2
    mask3d = mask_like(str(tmp_path / "series"), vol_label.astype(np.uint8), tmp_path / "series_mask.nii.gz")

    hd2 = load_hospital(cfg_for("task.num_classes=3", "data.spatial_size=[32,32]"), "h2d", 0,
                        data_path=datalist(tmp_path, [{"image": "ct.dcm", "label": mask2d}] * 2, name="d2.json"))
    assert hd2.test[0][0].shape == (1, 128, 128)
    cfg3 = cfg_for("task=seg3d", "task.num_classes=3", "data.preprocess=ct", "data.spatial_size=[8,8,8]")
    hd3 = load_hospital(cfg3, "h3d", 0, data_path=datalist(tmp_path, [{"image": series, "label": mask3d}] * 2))
    x, y = hd3.test[0]  # ct preset: RAS, 1.5 x 1.5 x 2 mm, HU window, foreground crop
    assert x.shape == y.shape and x.shape[0] == 1 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.unique().tolist()) <= {0.0, 1.0, 2.0} and (y == 2).any()
    # the mask transposed relative to its series is refused, naming both files
    np_mask = np.asarray(nib.load(tmp_path / mask3d).dataobj)
    nib.save(nib.Nifti1Image(np.swapaxes(np_mask, 0, 1), nib.load(tmp_path / mask3d).affine), tmp_path / "t.nii.gz")
    with pytest.raises(DataError, match="t.nii.gz .* is not on the grid of .*series"):
        load_hospital(cfg3, "h3d", 0, data_path=datalist(tmp_path, [{"image": series, "label": "t.nii.gz"}] * 2,
                                                         name="d3.json"))


# ---------------------------------------------------------------- cache, presets, bad files


def test_records_are_prepared_once_and_again_only_when_a_file_or_the_preset_changes(tmp_path, monkeypatch):
    image, label = blobs((24, 24), 6)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image + i), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(4)]
    path, cache = datalist(tmp_path, entries), tmp_path / "cache"
    reads = []
    real = decathlon.read_record
    monkeypatch.setattr(decathlon, "read_record", lambda record, *a: reads.append(record["name"]) or real(record, *a))

    def load(*overrides):
        decathlon._prepared.cache_clear()  # a fresh process, as Flower starts one per message
        return load_hospital(cfg_for("task.num_classes=3", *overrides), "h", 0, data_path=path, cache_dir=cache)

    first = load()
    assert len(reads) == 4 and (cache / decathlon.CARD_FILE).is_file()
    again = load()
    assert len(reads) == 4  # nothing prepared again
    assert torch.equal(first.test[0][0], again.test[0][0])
    os.utime(tmp_path / "i2.nii.gz", ns=(1, 10**18))  # a file changed: that record only
    load()
    assert len(reads) == 5
    load("task.num_classes=4")  # the tensors' meaning changed: every record again
    assert len(reads) == 9


def test_a_preset_that_differs_from_the_servers_is_refused_and_targets_are_confined(tmp_path):
    from carefl.data.presets import load_preset

    with pytest.raises(ConfigError, match="differs from the one the server planned with"):
        load_preset("ct", expected_digest="0" * 64)
    (tmp_path / "evil.yaml").write_text(
        "name: evil\nsteps:\n  - _target_: os.system\n    command: 'touch /tmp/x'\naugment: []\ncrop_pos: 1\ncrop_neg: 1\n")
    with pytest.raises(ConfigError, match="only monai.transforms.<Class> may be instantiated"):
        load_preset("evil", directory=tmp_path)
    with pytest.raises(ConfigError, match="data.preprocess='nope' is not a preset; choose one of"):
        cfg_for("data.preprocess=nope")


def test_bad_files_skip_within_the_policy_and_stop_beyond_it(tmp_path, caplog):
    image, label = blobs((24, 24), 7)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(4)]
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    entries.append({"image": "broken.nii.gz", "label": "l0.nii.gz"})
    path = datalist(tmp_path, entries, test=entries[:1])
    with pytest.raises(DataError, match=r"1 record\(s\) cannot be used .*max-bad-files=0.*broken.nii.gz.*carefl-data check"):
        load_hospital(cfg_for("task.num_classes=3"), "h", 0, data_path=path)
    hd = load_hospital(cfg_for("task.num_classes=3"), "h", 0, data_path=path, max_bad_files=1)
    assert len(hd.train) == 4 and "skipped (max-bad-files=1)" in caplog.text


def test_carefl_data_check_prints_the_card_and_exits_by_the_data(tmp_path, capsys):
    image, label = blobs((24, 28), 8)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(3)]
    path = datalist(tmp_path, entries)
    assert data_check(["check", "--data-path", path, "--cache-dir", str(tmp_path / "c"), "task.num_classes=3"]) == 0
    out = capsys.readouterr().out
    assert "records: train 2/2 usable, test 1/1 usable; problems: 0" in out and "nibabel (NIfTI) x3" in out
    assert "native shape: [24, 28] .. [24, 28]" in out and "label voxels: 0:" in out
    card = json.loads((tmp_path / "c" / "data_card.json").read_text())
    assert set(card["label_voxel_fraction"]) == {"0", "1", "2"} and sum(card["label_voxel_fraction"].values()) == pytest.approx(1)
    entries.append({"image": "i0.nii.gz", "label": "missing.nii.gz"})
    bad = datalist(tmp_path, entries, name="bad.json")
    assert data_check(["check", "--data-path", bad, "--cache-dir", str(tmp_path / "c"), "task.num_classes=3"]) == 1
    assert "missing.nii.gz does not exist; fix the path in the datalist" in capsys.readouterr().out
    assert data_check(["check", "--data-path", path, "task.num_classes=oops"]) == 2
    assert "task.num_classes" in capsys.readouterr().err


# ---------------------------------------------------------------- patches under DP, sliding windows


def test_a_poisson_batch_never_holds_two_patches_of_one_record(tmp_path):
    from carefl import privacy

    image, label = blobs((40, 36), 9)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(12)]
    cfg = cfg_for("task.num_classes=3", "data.spatial_size=[16,16]")
    hd = load_hospital(cfg, "h", 0, data_path=datalist(tmp_path, entries, test=entries[:1]))
    assert len(hd.train) == 12  # records: the accountant's N, whatever the patches
    x, y = hd.train[3]
    assert x.shape == y.shape == (1, 16, 16)  # one patch per draw, not a stack of patches
    model = build_model(cfg)
    _, _, loader, _ = privacy.make_private(model, make_optimizer(model, "sgd", 0.1), make_loader(hd.train, 6, 0),
                                           noise_multiplier=1.0, max_grad_norm=1.0, accountant="prv",
                                           secure_mode=False, history=[])
    batches = [list(b) for _, b in zip(range(300), loader.batch_sampler)]
    assert all(len(b) == len(set(b)) for b in batches)  # each record at most once per batch
    assert max(len(b) for b in batches) > 1


def test_sliding_windows_score_the_native_label_exactly(tmp_path):
    """An oracle net (logit_c = -(x - c)^2 on an image equal to its label map) must score Dice 1
    on images whose sides are not multiples of the window or of the net's stride."""
    entries = []
    for i, shape in enumerate([(21, 19), (37, 23)]):
        _, label = blobs(shape, 10 + i)
        entries.append({"image": nifti(tmp_path / f"i{i}.nii.gz", label.astype(np.float32)),
                        "label": nifti(tmp_path / f"l{i}.nii.gz", label)})
    cfg = cfg_for("task.num_classes=3", "data.spatial_size=[8,8]", "data.preprocess=png2d")
    hd = load_hospital(cfg, "h", 0, data_path=datalist(tmp_path, entries, test=entries))
    assert hd.test[1][0].shape == (1, 37, 23)
    scale = float(hd.test[0][1].max()) / float(hd.test[0][0].max())  # png2d scales images to [0, 1]

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.cat([-(x * scale - c) ** 2 for c in range(3)], dim=1)

    class Background(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.ones_like(x), torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    assert evaluate(Oracle(), hd.test, cfg.task, window=hd.window) == {
        "dice": 1.0, "dice_1": 1.0, "dice_2": 1.0, "hd95": 0.0, "surface_dice": 1.0,
        "dice_ci_low": 1.0, "dice_ci_high": 1.0}
    missed = evaluate(Background(), hd.test, cfg.task, window=hd.window)
    assert missed["dice"] == 0.0 and missed["surface_dice"] == 0.0
    assert missed["hd95"] == pytest.approx((np.hypot(21, 19) + np.hypot(37, 23)) / 2)  # a miss: the diagonal


# ---------------------------------------------------------------- federations end to end


def _federate(tmp_path: Path, hospitals: dict[str, str], *overrides: str) -> dict:
    cmd = [str(BIN / "carefl-sim"), f"output_dir={tmp_path / 'out'}", "data=decathlon", *SMALL_UNET,
           "+data.datalists={" + ", ".join(f"{h}: {p}" for h, p in hospitals.items()) + "}",
           f"federation.hospitals=[{','.join(hospitals)}]", "federation.min_hospitals=2", "federation.rounds=2",
           "federation.batch_size=2", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith(".")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    for h in hospitals:
        assert (run_dir / "hospitals" / h / "data-cache" / "data_card.json").is_file()
    summary = (run_dir / "summary.md").read_text()
    assert "per-class Dice of the final federated model" in summary and "| 2 |" in summary
    assert (run_dir / "plots" / "dice_2.png").is_file()
    return metrics, run_dir


@pytest.mark.slow
def test_a_2d_multiclass_federation_of_png_and_nifti_hospitals(tmp_path):
    sites = {}
    for h, (writer, ext) in {"png-site": (png, ".png"), "nifti-site": (nifti, ".nii.gz")}.items():
        (tmp_path / h).mkdir()
        entries = []
        for i in range(6):
            image, label = blobs((30, 26), 20 + i)
            entries.append({"image": writer(tmp_path / h / f"i{i}{ext}", np.clip(image, 0, 255)),
                            "label": writer(tmp_path / h / f"l{i}{ext}", label)})
        sites[h] = datalist(tmp_path / h, entries[:4], entries[4:])
    metrics, _ = _federate(tmp_path, sites, "task.num_classes=3", "data.spatial_size=[16,16]")
    final = metrics["rounds"][-1]
    assert set(final["eval"]) == set(sites)
    for h in sites:
        assert {"dice", "dice_1", "dice_2"} <= set(final["eval"][h]) and 0 <= final["eval"][h]["dice_2"] <= 1
    assert set(metrics["baselines"]["pooled"]) == set(sites)


@pytest.mark.slow
def test_a_3d_multiclass_federation_of_nifti_and_dicom_series_hospitals(tmp_path):
    (tmp_path / "nifti").mkdir()
    (tmp_path / "dicom").mkdir()
    nifti_entries, dicom_entries = [], []
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(4):
        image, label = blobs((20, 18, 14), 30 + i)
        nifti_entries.append({"image": nifti(tmp_path / "nifti" / f"i{i}.nii.gz", image * 2 - 100, affine),
                              "label": nifti(tmp_path / "nifti" / f"l{i}.nii.gz", label, affine)})
        series = write_series(tmp_path / "dicom" / f"s{i}", (np.moveaxis(image, 2, 0) * 2 - 100).astype(np.int16),
                              spacing=(1.5, 1.5))
        read = np.asarray(LoadImage(image_only=True)(str(tmp_path / "dicom" / series)))
        vol = np.zeros(read.shape, np.uint8)
        vol[tuple(slice(s // 4, 3 * s // 4) for s in read.shape)] = 1
        vol[tuple(slice(3 * s // 8, 5 * s // 8) for s in read.shape)] = 2
        dicom_entries.append({"image": series, "label": mask_like(str(tmp_path / "dicom" / series), vol,
                                                                 tmp_path / "dicom" / f"l{i}.nii.gz")})
    sites = {"nifti-site": datalist(tmp_path / "nifti", nifti_entries[:3], nifti_entries[3:]),
             "dicom-site": datalist(tmp_path / "dicom", dicom_entries[:3], dicom_entries[3:])}
    metrics, run_dir = _federate(tmp_path, sites, "task=seg3d", "task.num_classes=3", "data.preprocess=ct",
                                 "data.spatial_size=[8,8,8]", "personalization=finetune", "personalization.epochs=1")
    for h in sites:
        assert {"dice", "dice_1", "dice_2"} <= set(metrics["rounds"][-1]["eval"][h])

    # carefl-predict on new studies: masks come back on each input's own voxel grid
    lps = np.array([[-0.9, 0, 0, 12.0], [0, -0.9, 0, -7.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    image, _ = blobs((23, 19, 9), 40)
    new = nifti(tmp_path / "new_lps.nii.gz", image * 2 - 100, lps)
    proc = subprocess.run([str(BIN / "carefl-predict"), str(run_dir), str(tmp_path / new),
                           str(tmp_path / "dicom" / dicom_entries[0]["image"]), str(tmp_path / "missing.nii.gz"),
                           "--out", str(tmp_path / "pred"), "--explain"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one of three studies is missing
    assert "[3/3] " in proc.stdout and "missing.nii.gz does not exist" in proc.stdout
    for source, written in ((tmp_path / new, "new_lps_seg.nii.gz"), (tmp_path / "dicom" / "s0", "s0_seg.nii.gz")):
        mask = nib.load(tmp_path / "pred" / written)
        read = LoadImage(image_only=True)(str(source))
        assert mask.shape == tuple(read.shape)
        assert np.allclose(mask.affine, np.asarray(read.affine), atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2}
        assert (tmp_path / "pred" / written.replace("_seg.nii.gz", "_explain.png")).is_file()
    # a hospital's own personal model, checked against its signed receipt
    personal = [str(BIN / "carefl-predict"), str(run_dir), str(tmp_path / new), "--out", str(tmp_path / "pp"),
                "--personal", str(run_dir / "hospitals" / "nifti-site")]
    proc = subprocess.run(personal, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "personal model" in proc.stdout, proc.stdout + proc.stderr
    assert nib.load(tmp_path / "pp" / "new_lps_seg.nii.gz").shape == (23, 19, 9)
    (pt,) = (run_dir / "hospitals" / "nifti-site" / "personal").glob("*.pt")
    swapped = torch.load(run_dir / "model_final.pt", weights_only=True)  # a model it never trained
    torch.save(swapped, pt)
    proc = subprocess.run(personal, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not match the hospital's signed receipt" in proc.stderr
    # a model file that is not the ledger's is refused before anything runs
    state = torch.load(run_dir / "model_final.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, run_dir / "model_final.pt")
    proc = subprocess.run([str(BIN / "carefl-predict"), str(run_dir), str(tmp_path / new), "--out",
                           str(tmp_path / "pred2")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not verify against the run's ledger" in proc.stderr


def test_a_request_carries_the_presets_name_and_digest_never_its_transforms():
    from carefl.data.presets import load_preset
    from carefl.request import RequestError, build_request, parse_request

    text = build_request(cfg_for("data.preprocess=ct"), 1, "a" * 64, None, None)
    data = json.loads(text)["config"]["data"]
    assert data["preprocess"] == "ct" and data["preprocess_digest"] == load_preset("ct").digest
    assert "_target_" not in text and "monai" not in text
    with pytest.raises(RequestError, match="data.preprocess_digest"):
        parse_request(text.replace(data["preprocess_digest"], "../../etc/passwd"), simulated=False)


@pytest.mark.parametrize("name", ["png2d", "ct", "mri"])
def test_every_presets_augmentation_keeps_the_patch_shape_and_the_label_classes(name):
    from carefl.data.presets import available, build_transforms, load_preset

    assert name in available()
    _, augment = build_transforms(load_preset(name))
    shape = (1, 16, 24) if name == "png2d" else (1, 16, 24, 8)
    label = torch.randint(0, 3, shape).float()
    for _ in range(20):
        out = augment({"image": torch.rand(shape), "label": label.clone()})
        assert tuple(out["image"].shape) == tuple(out["label"].shape) == shape
        assert set(torch.as_tensor(out["label"]).unique().tolist()) <= {0.0, 1.0, 2.0}


def test_only_a_hospital_that_allows_it_shares_its_data_cards_counts_and_label_frequencies(tmp_path):
    from carefl.hospital import EVALUATE, handle
    from carefl.replies import RawReply, check_eval_reply
    from carefl.request import build_request

    entries = []
    for i in range(4):
        image, label = blobs((24, 24), 50 + i)
        entries.append({"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)})
    path = datalist(tmp_path, entries[:3], entries[3:])
    cfg = cfg_for("task.num_classes=3", "privacy=none", "federation.rounds=1")
    text = build_request(cfg, 1, "ef" * 32, None, None)
    state = build_model(cfg).state_dict()
    node = {"hospital": "st-mary", "data-path": path, "state-dir": str(tmp_path / "state"), "epsilon-cap": "8",
            "delta": "1e-5", "require-dp": "false"}
    private = handle(EVALUATE, text, state, node)
    assert private.status == "ok", private.reason
    assert not any(k.startswith("card_") for k in private.metrics)  # the default: nothing about the data
    shared = handle(EVALUATE, text, state, {**node, "share-data-card": "true"})
    card = {k: v for k, v in shared.metrics.items() if k.startswith("card_")}
    assert card["card_train_records"] == 3 and card["card_test_records"] == 1 and card["card_problems"] == 0
    assert sum(v for k, v in card.items() if k.startswith("card_label_")) == pytest.approx(1.0)
    assert set(card) == {"card_train_records", "card_test_records", "card_problems", "card_label_0", "card_label_1",
                         "card_label_2"}  # counts and label frequencies, nothing else
    names = ("dice", "dice_1", "dice_2", "hd95", "surface_dice")
    raw = RawReply(1, status={"hospital": "st-mary", "status": "ok"}, metrics=shared.metrics)
    assert isinstance(check_eval_reply(raw, {1: "st-mary"}, names)[1], dict)
    raw.metrics = {**shared.metrics, "card_label_1": 7.0}  # a fraction above 1 is refused
    assert "out of range" in check_eval_reply(raw, {1: "st-mary"}, names)[1]
    raw.metrics = {**shared.metrics, "card_filename": 1.0}
    assert "unknown" in check_eval_reply(raw, {1: "st-mary"}, names)[1]


def test_the_summary_lists_what_hospitals_shared_about_their_data(tmp_path):
    from carefl.report import Report

    report = Report(tmp_path, compose_config(["federation.hospitals=[a,b]"]))
    report.add_evaluation(1, {
        "a": {"dice": 0.8, "num_examples": 3.0, "card_train_records": 12.0, "card_test_records": 3.0,
              "card_problems": 1.0, "card_label_0": 0.9, "card_label_1": 0.1},
        "b": {"dice": 0.7, "num_examples": 3.0},  # its policy shares nothing
    })
    summary = report.finish("completed")
    assert "| a | 12 | 3 | 1 | 0: 90.0%, 1: 10.0% |" in summary and "| b |" not in summary.split("share-data-card")[1]


def test_a_damaged_cache_entry_is_prepared_again_not_a_crash(tmp_path):
    image, label = blobs((24, 24), 60)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(3)]
    cache = tmp_path / "cache"
    hd = load_hospital(cfg_for("task.num_classes=3"), "h", 0, data_path=datalist(tmp_path, entries), cache_dir=cache)
    before = hd.test[0]
    before = tuple(t.clone() for t in before)  # items map the files read-only; keep a copy
    for npy in cache.glob("*.npy"):
        npy.write_bytes(b"torn")  # a disk error, an edit: not an array file any more
    after = hd.test[0]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for i in range(len(hd.train)):
        hd.train[i]
    assert all(np.load(npy, allow_pickle=False).size for npy in cache.glob("*.npy"))  # every entry whole again


def test_cache_entries_map_their_recorded_layout_and_a_rewritten_array_is_prepared_again(tmp_path):
    """Items are mapped through the dtype, shape and offset the entry's JSON records; a file whose
    size no longer matches (a valid .npy of another dtype) is prepared again, and an entry written
    before layouts were recorded still opens with np.load."""
    import json

    image, label = blobs((24, 24), 61)
    entries = [{"image": nifti(tmp_path / f"i{i}.nii.gz", image), "label": nifti(tmp_path / f"l{i}.nii.gz", label)}
               for i in range(3)]
    cache, cfg = tmp_path / "cache", cfg_for("task.num_classes=3")
    path = datalist(tmp_path, entries)
    hd = load_hospital(cfg, "h", 0, data_path=path, cache_dir=cache)
    want = tuple(t.clone() for t in hd.test[0])
    for npy in cache.glob("*.npy"):
        assert torch.equal(torch.from_numpy(np.load(npy)), torch.from_numpy(np.load(npy, mmap_mode="r")))
    metas = [m for m in cache.glob("*.json") if m.name != "data_card.json"]
    assert len(metas) == 3 and all(set(json.loads(m.read_text())["layout"]) == {"image", "label"} for m in metas)
    for npy in cache.glob("*.npy"):  # same values, another dtype: a valid .npy of another size
        np.save(npy, np.load(npy).astype(np.float64), allow_pickle=False)
    got = hd.test[0]
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    for meta in cache.glob("*.json"):  # as an older CareFL wrote them: no layout
        data = json.loads(meta.read_text())
        data.pop("layout", None)
        meta.write_text(json.dumps(data))
    old = load_hospital(cfg, "h", 0, data_path=path, cache_dir=cache)
    got = old.test[0]
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def write_multiframe(path: Path, volume: np.ndarray, enhanced: bool = False) -> str:
    """One multi-frame DICOM file (``volume`` int16 ``(frames, rows, cols)``), written with
    pydicom: a legacy CT (SpacingBetweenSlices 2.5), or ``enhanced``: an Enhanced CT whose
    functional groups give PixelSpacing 0.7 x 0.9, the orientation and each frame's position,
    2.5 mm apart (the geometry :func:`write_series` gives the same volume as a series)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    uids = (generate_uid(), generate_uid(), generate_uid())
    if not enhanced:
        ds = ct_dataset(volume.shape[1:], volume, uids, NumberOfFrames=volume.shape[0], PixelSpacing=[0.7, 0.7],
                        SliceThickness=2.5, SpacingBetweenSlices=2.5, ImagePositionPatient=[0.0, 0.0, 0.0])
    else:
        ds = ct_dataset(volume.shape[1:], volume, uids, NumberOfFrames=volume.shape[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
        del ds.ImageOrientationPatient
        measures, orientation, shared = Dataset(), Dataset(), Dataset()
        measures.PixelSpacing, measures.SliceThickness = [0.7, 0.9], 2.5
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for k in range(volume.shape[0]):
            position, frame = Dataset(), Dataset()
            position.ImagePositionPatient = [0.0, 0.0, k * 2.5]
            frame.PlanePositionSequence = Sequence([position])
            frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.save_as(path, enforce_file_format=True)
    return path.name


@pytest.mark.parametrize("enhanced", [False, True], ids=["legacy", "enhanced"])
def test_a_multiframe_dicom_file_is_refused_not_misplaced(tmp_path, enhanced):
    """MONAI reads a multi-frame file on a wrong grid: a legacy one with 1 mm between frames
    whatever its header says (2.5 here); an Enhanced one with an identity affine and its axes
    reordered, where the same volume and geometry as a series folder reads right. CareFL refuses
    both with the fix instead of training on a wrong grid."""
    image, label = blobs((6, 20, 16), 70)
    volume = (image * 2 - 100).astype(np.int16)
    name = write_multiframe(tmp_path / "mf.dcm", volume, enhanced)
    read = LoadImage(image_only=True)(str(tmp_path / name))
    series = LoadImage(image_only=True)(str(tmp_path / write_series(tmp_path / "s", volume, (0.7, 0.9), 2.5)))
    assert not (read.shape == series.shape and np.allclose(np.asarray(read.affine), np.asarray(series.affine)))
    assert 1.0 in np.linalg.norm(np.asarray(read.affine)[:3, :3], axis=0).round(3)  # the reader's wrong spacing
    mask = nifti(tmp_path / "m.nii.gz", np.zeros(tuple(read.shape), np.uint8), np.asarray(read.affine))
    entries = [{"image": name, "label": mask}] * 2
    with pytest.raises(DataError, match="mf.dcm is a multi-frame DICOM file, whose frames the reader cannot place.*dcm2niix"):
        load_hospital(cfg_for("task=seg3d", "data.spatial_size=[8,8,8]"), "h", 0, data_path=datalist(tmp_path, entries))


def test_batched_augmentation_draws_what_the_monai_transforms_declare():
    """Rotation is MONAI's Rotate, exactly; flips, scaling, shifting and rotation each happen to
    about `prob` of the samples, independently; a batch keeps its length (one patch per record)."""
    from monai.transforms import Rotate

    from carefl.data.augment import BatchAugment, _rotate
    from carefl.data.presets import build_transforms, load_preset

    _, augment = build_transforms(load_preset("png2d"))
    rotated = next(t for t in augment.transforms if type(t).__name__ == "RandRotated")
    image = torch.rand(1, 1, 20, 28)
    torch.manual_seed(3)
    batch = _rotate(rotated)({"image": image.repeat(64, 1, 1, 1)})
    torch.manual_seed(3)
    chosen = torch.rand(64) < rotated.prob
    angles = (-0.26 + 0.52 * torch.rand(64, dtype=torch.float64))[chosen]
    for out, angle in zip(batch["image"][chosen], angles):
        expected = torch.as_tensor(Rotate(float(angle), mode="bilinear", padding_mode="zeros")(image[0]))
        assert (out - expected).abs().max() < 1e-4
    assert torch.equal(batch["image"][~chosen], image.repeat(int((~chosen).sum()), 1, 1, 1))

    collate = BatchAugment(augment)
    x = torch.ones(1, 16, 16)
    x[:, :8] = 2.0  # top half bright: a flip along axis 0 moves it
    label = (x > 1.5).float()
    images, labels = collate([(x, label)] * 2000)
    assert images.shape == (2000, 1, 16, 16) and set(labels.unique().tolist()) <= {0.0, 1.0}
    flipped = (labels[:, 0, 12, 8] == 1.0).float().mean()
    assert 0.45 < flipped < 0.55  # RandFlipd prob 0.5 (rotations of <= 15 degrees keep these pixels)
    centre = images[:, 0, 8, 8] / torch.where(labels[:, 0, 8, 8] > 0, 2.0, 1.0)
    assert 0.4 < ((centre - 1.0).abs() > 1e-3).float().mean() < 0.9  # intensity jitter, not on everyone


def test_the_patch_sampler_draws_foreground_centres_as_monai_does():
    """pos_neg_patch with crop_pos = crop_neg: half the patches centred on the (tiny) foreground,
    every patch inside the image and of the requested size."""
    import numpy as np

    from carefl.data.augment import pos_neg_patch

    label = torch.zeros(1, 64, 64)
    label[0, 5:7, 50:52] = 1.0  # 4 foreground voxels near an edge
    image = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    rand = np.random.RandomState(0)
    hits = 0
    for _ in range(1000):
        patch = pos_neg_patch({"image": image, "label": label}, (16, 16), 1.0, 1.0, rand)
        assert patch["image"].shape == patch["label"].shape == (1, 16, 16)
        hits += int(patch["label"].sum() == 4)
    # foreground centre (p = 0.5) always holds all 4 voxels; a background centre rarely does
    assert 0.45 < hits / 1000 < 0.6
    whole = pos_neg_patch({"image": image, "label": label}, (64, 64), 1.0, 1.0, rand)
    assert torch.equal(whole["image"], image)
