"""A hospital's data card: aggregate, non-identifying figures of its datalist, and its first problems.

    card = data_card(prepared, task)      # prepared: carefl.data.decathlon.Prepared
    print(format_card(card))

What it holds: records per split (listed, usable, with problems), native image shapes and
voxel spacings (min/max per axis), channels, intensity range, label values with their voxel
fractions (segmentation) or counts per class (classification), the file readers used, and the
first problems, each naming the entry, the file and the fix. No file name of a usable record,
no pixel value beyond the global min/max, no per-record figure: it is written for the
hospital's own operator (``<cache-dir>/data_card.json``). Only :func:`shared_figures` (record
counts and label frequencies, nothing else) may go to the server, and only when the
hospital's site policy says ``share-data-card: true``.
"""

from __future__ import annotations

import os
from collections import Counter

#: problems a card lists in full (the count covers all)
MAX_PROBLEMS = 10


#: :func:`reader_of` a single DICOM file
DICOM_FILE = "pydicom (DICOM file)"


def reader_of(path: str) -> str:
    """The MONAI reader that opens ``path``, by what it is (as ``LoadImage`` picks it)."""
    lower = path.lower()
    if os.path.isdir(path):
        return "pydicom (series folder)"
    if lower.endswith((".nii", ".nii.gz")):
        return "nibabel (NIfTI)"
    if lower.endswith((".png", ".jpg", ".jpeg", ".bmp")):
        return "pillow (2D image)"
    return DICOM_FILE


def data_card(prepared, task, records: dict[str, list[dict]]) -> dict:
    """The card (a JSON-able dict) of a prepared datalist.

    Args:
        prepared: :class:`carefl.data.decathlon.Prepared` (its caches hold one card per usable record).
        task: ``cfg.task`` (kind, num_classes).
        records: ``{"train": [...], "test": [...]}`` datalist records (for counts and readers).
    """
    cards = prepared.train.cards + prepared.test.cards
    card: dict = {
        "splits": {split: {"listed": len(records[split]), "usable": len(getattr(prepared, split))}
                   for split in ("train", "test")},
        "problems": len(prepared.problems),
        "first_problems": [msg for _, msg in prepared.problems[:MAX_PROBLEMS]],
        "readers": dict(Counter(reader_of(f) for split in records.values() for r in split for f in r["image"])),
    }
    if not cards:
        return card
    dims = len(cards[0]["shape"])
    card["shape_min"] = [min(c["shape"][a] for c in cards) for a in range(dims)]
    card["shape_max"] = [max(c["shape"][a] for c in cards) for a in range(dims)]
    card["spacing_min_mm"] = [min(c["spacing"][a] for c in cards) for a in range(dims)]
    card["spacing_max_mm"] = [max(c["spacing"][a] for c in cards) for a in range(dims)]
    card["orientations"] = dict(Counter(c["axes"] for c in cards))
    card["channels"] = sorted({c["channels"] for c in cards})
    card["intensity_range"] = [min(c["min"] for c in cards), max(c["max"] for c in cards)]
    if task["kind"] == "segmentation":
        voxels: Counter = Counter()
        for c in cards:
            voxels.update({int(k): v for k, v in c["label_voxels"].items()})
        total = sum(voxels.values())
        card["label_voxel_fraction"] = {str(k): voxels[k] / total for k in sorted(voxels)}
        card["label_meaning"] = ("0 = background, 1 = foreground" if int(task["num_classes"]) == 1
                                 else f"class indices 0..{int(task['num_classes']) - 1} (0 = background)")
    else:
        card["class_counts"] = {str(k): v for k, v in sorted(Counter(c["class"] for c in cards).items())}
    return card


def format_card(card: dict) -> str:
    """The card as lines for a terminal."""
    s = card["splits"]
    lines = [f"records: train {s['train']['usable']}/{s['train']['listed']} usable, "
             f"test {s['test']['usable']}/{s['test']['listed']} usable; problems: {card['problems']}",
             "readers: " + ", ".join(f"{k} x{v}" for k, v in card["readers"].items())]
    if "shape_min" in card:
        lines += [
            f"native shape: {card['shape_min']} .. {card['shape_max']} voxels; channels {card['channels']}",
            f"spacing: {card['spacing_min_mm']} .. {card['spacing_max_mm']} mm; orientations {card['orientations']}",
            f"intensity range: {card['intensity_range'][0]:.4g} .. {card['intensity_range'][1]:.4g}",
        ]
    if "label_voxel_fraction" in card:
        lines.append("label voxels: " + ", ".join(f"{k}: {v:.2%}" for k, v in card["label_voxel_fraction"].items())
                     + f" ({card['label_meaning']})")
    if "class_counts" in card:
        lines.append("classes: " + ", ".join(f"{k}: {v}" for k, v in card["class_counts"].items()))
    if card["first_problems"]:
        lines.append(f"first {len(card['first_problems'])} problem(s):")
        lines += [f"  - {p}" for p in card["first_problems"]]
    return "\n".join(lines)


#: at most this many label values / classes are shared (a card with more shares none of them)
MAX_SHARED_LABELS = 64


def shared_figures(card: dict) -> dict[str, float]:
    """What a hospital may tell the server about its data (``share-data-card``): usable record
    counts per split, the number of unusable records, and label frequencies -- voxel fractions
    per label value (``card_label_<v>``, segmentation) or record counts per class
    (``card_class_<c>``, classification). No shape, spacing, intensity or file name."""
    out = {"card_train_records": float(card["splits"]["train"]["usable"]),
           "card_test_records": float(card["splits"]["test"]["usable"]), "card_problems": float(card["problems"])}
    labels = card.get("label_voxel_fraction") or {}
    classes = card.get("class_counts") or {}
    if len(labels) <= MAX_SHARED_LABELS:
        out.update({f"card_label_{v}": float(f) for v, f in labels.items()})
    if len(classes) <= MAX_SHARED_LABELS:
        out.update({f"card_class_{c}": float(n) for c, n in classes.items()})
    return out
