"""A 3D multi-class federation on generated NIfTI volumes, against its local-only and pooled baselines.

    python benchmarks/clinical_3d.py [--hospitals 3] [--train 8] [--test 3] [--side 48] \\
        [--workdir DIR] [carefl-sim overrides ...]

Writes, per hospital, ``--train`` + ``--test`` NIfTI volumes of about ``--side`` voxels per axis
(sizes vary by +-25% per study; each hospital has its own voxel spacing and intensity scale and
offset, as its own scanner would) with a 3-class label map: background 0, an ellipsoidal
"organ" 1 and a "lesion" 2 inside it. Then runs ``carefl-sim`` with ``data=decathlon``,
``task=seg3d task.num_classes=3``, the ``mri`` preset (RAS, 1 mm, foreground crop, z-score),
patch training and sliding-window evaluation at native resolution, and the baselines, and prints
the run's ``summary.md`` (mean foreground Dice per hospital for the federated model, the pooled
model and each local-only model, then per-class Dice). Extra arguments are passed to
``carefl-sim`` (e.g. ``privacy=none``, ``federation.rounds=8``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["federation.rounds=6", "federation.local_epochs=2", "federation.batch_size=2",
            "model.channels=[8,16,32]", "model.strides=[2,2]", "data.spatial_size=[32,32,32]"]


def study(rng: np.random.Generator, side: int, scale: float, offset: float):
    """(image float32, label uint8) of one generated study."""
    shape = tuple(int(side * rng.uniform(0.75, 1.25)) for _ in range(3))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array([s * rng.uniform(0.4, 0.6) for s in shape], np.float32)
    radii = np.array([s * rng.uniform(0.2, 0.3) for s in shape], np.float32)
    organ = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    lesion_c = centre + radii * rng.uniform(-0.4, 0.4, 3)
    lesion = (((grid - lesion_c[:, None, None, None]) / (radii[:, None, None, None] * 0.35)) ** 2).sum(0) <= 1
    label = organ.astype(np.uint8) + (organ & lesion).astype(np.uint8)
    body = (((grid - centre[:, None, None, None]) / (radii[:, None, None, None] * 1.8)) ** 2).sum(0) <= 1
    image = body * 1.0 + label * 0.8 + rng.normal(0, 0.35, shape)
    return (image * scale + offset).astype(np.float32) * body, label


def write_hospital(root: Path, index: int, n_train: int, n_test: int, side: int) -> str:
    """One hospital's NIfTI files and datalist; returns the datalist path."""
    rng = np.random.default_rng(1000 + index)
    spacing = 1.0 + 0.25 * index  # each scanner its own voxel size (mm)
    scale, offset = 100 * (1 + 0.5 * index), 20.0 * index
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_train + n_test):
        image, label = study(rng, side, scale, offset)
        affine = np.diag([spacing, spacing, spacing * 1.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / f"lbl{i}.nii.gz"))
        entries.append({"image": f"img{i}.nii.gz", "label": f"lbl{i}.nii.gz"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries[:n_train], "test": entries[n_train:]}))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--test", type=int, default=3)
    parser.add_argument("--side", type=int, default=48)
    parser.add_argument("--workdir", default=None)
    args, overrides = parser.parse_known_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="carefl-3d-"))
    names = [f"site{i}" for i in range(args.hospitals)]
    lists = {h: write_hospital(work / h, i, args.train, args.test, args.side) for i, h in enumerate(names)}
    print(f"data: {args.hospitals} hospitals x ({args.train} train + {args.test} test) volumes of ~{args.side}^3 in {work}")
    cmd = [str(Path(sys.executable).parent / "carefl-sim"), f"output_dir={work / 'out'}", "data=decathlon",
           "task=seg3d", "task.num_classes=3", "data.preprocess=mri", f"federation.hospitals=[{','.join(names)}]",
           "+data.datalists={" + ", ".join(f"{h}: {p}" for h, p in lists.items()) + "}", *DEFAULTS, *overrides]
    print("running:", " ".join(cmd[1:]), flush=True)
    start, load = time.monotonic(), os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"carefl-sim failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (run_dir,) = [p for p in (work / "out").iterdir() if p.is_dir() and not p.name.startswith(".")]
    print(f"\n{(run_dir / 'summary.md').read_text()}")
    print(f"wall {time.monotonic() - start:.0f} s; load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}; "
          f"run directory {run_dir}")


if __name__ == "__main__":
    main()
