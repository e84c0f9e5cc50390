"""Reading one datalist record from disk: image channels, label, and the checks no MONAI transform makes.

    record = {"name": "training[3]", "image": ["t1.nii.gz", "t2.nii.gz"], "label": "seg.nii.gz"}
    item = read_record(record, dims=3, in_channels=2, num_classes=4, segmentation=True)
    item["image"]  # MetaTensor float32 (C, *spatial), affine in RAS mm
    item["label"]  # MetaTensor float32 (1, *spatial): {0, 1} for num_classes=1, else class indices

Files go through MONAI ``LoadImage`` (``ensure_channel_first``), which picks the reader by file:
NIfTI -> nibabel, PNG/JPEG -> pillow, a DICOM file or a DICOM series folder -> pydicom (``PydicomReader``: affine from ImagePositionPatient/ImageOrientationPatient/
PixelSpacing, converted to RAS like the NIfTI one). A list of image files is stacked as channels
(e.g. four MRI sequences).

Checked here, each failure one :class:`~carefl.errors.DataError` naming the file and the fix:

- a multi-frame DICOM file is refused, legacy or Enhanced (MONAI would read it on a wrong
  grid, see :func:`_multiframe`): a series folder or NIfTI carries the same study;
- every channel file and the label share one geometry: spatial shape equal and affines equal
  within 1e-3 mm + 1e-4 relative (so a mask transposed or flipped relative to its image, or
  drawn on another grid, is refused rather than trained on);
- label values are whole numbers; ``num_classes=1`` (binary) accepts background 0 plus ONE
  foreground value (a 0/255 PNG mask is binary) and refuses a multi-class map instead of
  merging its classes; ``num_classes=K >= 2`` accepts values 0..K-1 only.

DICOM-SEG labels are not read: ``highdicom`` would decode them, but mapping its segments onto
the image's frames (frame of reference, per-frame positions) is a second geometry path that
we would have to trust blindly; hospitals export masks to NIfTI (e.g. ``dcm2niix``) instead.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from carefl.data.card import DICOM_FILE, reader_of
from carefl.errors import DataError

# MONAI logs that an optional GPU DICOM decoder is missing on every DICOM-capable read; it says
# nothing to a hospital (pydicom decodes on the CPU), so it is silenced once, here.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nvImageCodec decoder plugin did not register.*")

#: affine tolerance: |a - b| <= ATOL + RTOL * |b| elementwise (mm)
ATOL, RTOL = 1e-3, 1e-4
_READERS = ("no reader could open it (NIfTI is read by nibabel, PNG/JPEG by pillow, a DICOM file or "
            "series folder by pydicom; all three are installed with CareFL); check that the file is complete")


def _multiframe(file: str) -> bool:
    """Whether ``file`` is a multi-frame DICOM file. MONAI's PydicomReader cannot place the
    frames of one (measured here, MONAI 1.5): a legacy 6-frame CT with SpacingBetweenSlices 2.5
    read back with 1.0 mm between frames and its axes reordered; an Enhanced CT whose functional
    groups give PixelSpacing 0.7 x 0.9, orientation and a position 2.5 mm apart per frame read
    back with an identity affine (spacing 1, no origin) and its axes reordered, where the same
    volume as a series folder reads right. Its geometry handling of functional groups serves
    DICOM-SEG only. Either file would be trained on a wrong grid without any error."""
    if reader_of(file) != DICOM_FILE:
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception:  # not DICOM: the reader reports it
        return False
    return int(getattr(ds, "NumberOfFrames", 1) or 1) > 1


def _read(loader: LoadImage, name: str, role: str, file: str, dims: int) -> MetaTensor:
    if not os.path.exists(file):
        raise DataError(f"entry {name} {role} {file} does not exist; fix the path in the datalist")
    if _multiframe(file):
        raise DataError(f"entry {name} {role} {file} is a multi-frame DICOM file, whose frames the reader cannot place "
                        "(slice spacing and order); export the study as a DICOM series or NIfTI (e.g. dcm2niix)")
    try:
        img = loader(file)
    except Exception as e:  # MONAI wraps every reader's failure in its own types
        cause = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise DataError(f"entry {name} {role} {file}: {_READERS} ({cause})") from e
    img = img.float()
    if img.ndim == dims + 2 and img.shape[-1] == 1:  # a 2D slice saved as a 1-thick volume
        img = img[..., 0]
    if img.ndim != dims + 1:
        raise DataError(f"entry {name} {role} {file} has shape {tuple(img.shape[1:])} (channels "
                        f"{img.shape[0]}), which is not {dims}D; set task.spatial_dims or fix the file")
    return img


def geometry(img: MetaTensor) -> dict[str, Any]:
    """Spatial shape, voxel spacing (mm, from the affine's columns) and axis codes of ``img``."""
    import nibabel as nib

    affine = np.asarray(img.affine, dtype=np.float64)
    dims = img.ndim - 1
    spacing = np.linalg.norm(affine[:dims, :dims], axis=0)
    try:
        axes = "".join(nib.orientations.aff2axcodes(affine))
    except Exception:  # a degenerate affine has no axis codes
        axes = "?"
    return {"shape": tuple(int(s) for s in img.shape[1:]), "spacing": tuple(round(float(s), 4) for s in spacing),
            "axes": axes}


def check_same_grid(name: str, ref: MetaTensor, ref_file: str, other: MetaTensor, other_file: str) -> None:
    """Raise :class:`DataError` unless ``other`` lies on ``ref``'s voxel grid (shape and affine)."""
    a, b = geometry(ref), geometry(other)
    show = lambda g: f"(shape {g['shape']}, spacing {g['spacing']} mm, {g['axes']})"  # noqa: E731
    problem = None
    if a["shape"] != b["shape"]:
        problem = "shape"
    else:
        fa = np.asarray(ref.affine, dtype=np.float64)
        fb = np.asarray(other.affine, dtype=np.float64)
        if fa.shape != fb.shape or not np.allclose(fb, fa, atol=ATOL, rtol=RTOL):
            problem = "orientation" if a["axes"] != b["axes"] else "spacing" if a["spacing"] != b["spacing"] else "origin"
    if problem:
        raise DataError(
            f"entry {name}: {other_file} {show(b)} is not on the grid of {ref_file} {show(a)} (they differ in {problem}); "
            "a label or extra channel must be saved on its image's voxel grid (same shape, spacing, "
            "orientation and origin): re-export it from the image's geometry"
        )


def check_label_values(name: str, file: str, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label as class indices float32: {0, 1} for ``num_classes=1``, 0..K-1 otherwise."""
    values = torch.unique(label)
    if not torch.equal(values, torch.round(values)):
        frac = values[values != torch.round(values)][0].item()
        raise DataError(f"entry {name} label {file} holds non-integer values (e.g. {frac:g}); a mask holds "
                        "class indices (was it resampled with linear interpolation? use nearest)")
    shown = [int(v) for v in values[:8].tolist()] + (["..."] if len(values) > 8 else [])
    if num_classes == 1:
        foreground = values[values != 0]
        if len(foreground) > 1:
            raise DataError(f"entry {name} label {file} has values {shown}: a multi-class map; set "
                            f"task.num_classes={int(values.max()) + 1} (softmax over the classes, 0 = background) "
                            "or merge the classes in the files")
        return (label != 0).float()
    if values.min() < 0 or values.max() >= num_classes:
        raise DataError(f"entry {name} label {file} has values {shown}, outside 0..{num_classes - 1} for "
                        f"task.num_classes={num_classes}; set task.num_classes to the number of classes "
                        "(background included) or fix the labels")
    return label.float()


def read_image(name: str, files: list[str], dims: int, in_channels: int) -> MetaTensor:
    """One study's image, float32 ``(C, *spatial)``: ``files`` stacked as channels, checked to
    share one voxel grid and to give ``in_channels`` channels (``name`` is used in errors)."""
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    channels = [_read(loader, name, "image", f, dims) for f in files]
    for f, c in zip(files[1:], channels[1:]):
        check_same_grid(name, channels[0], files[0], c, f)
    image = torch.cat(channels) if len(channels) > 1 else channels[0]
    if image.shape[0] != in_channels:
        raise DataError(f"entry {name} image {', '.join(map(os.path.basename, files))} has {image.shape[0]} "
                        f"channel(s) but task.in_channels={in_channels}; set task.in_channels to match")
    return image


def read_record(record: dict, dims: int, in_channels: int, num_classes: int, segmentation: bool) -> dict:
    """``{"image", "label"}`` (segmentation) or ``{"image", "class"}`` of one datalist record.

    Args:
        record: ``name``, ``image`` (list of files, one per channel group), ``label`` (a file for
            segmentation, an int for classification); paths absolute.
        dims: ``task.spatial_dims``; in_channels: ``task.in_channels``; num_classes: ``task.num_classes``.
    Raises:
        DataError: unreadable file, wrong dimensionality or channel count, geometry mismatch,
            invalid label values (see the module docstring).
    """
    name, files = record["name"], record["image"]
    image = read_image(name, files, dims, in_channels)
    if not segmentation:
        return {"image": image, "class": int(record["label"])}
    label = _read(LoadImage(image_only=True, ensure_channel_first=True), name, "label", record["label"], dims)
    if label.shape[0] != 1:
        raise DataError(f"entry {name} label {record['label']} has {label.shape[0]} channels; a label map has one")
    check_same_grid(name, image, files[0], label, record["label"])
    values = check_label_values(name, record["label"], label.as_tensor(), num_classes)
    return {"image": image, "label": MetaTensor(values, meta=label.meta)}
