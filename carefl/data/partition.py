"""Label-skewed hospitals from one pooled dataset: the Dirichlet class split.

Federated-learning papers simulate hospitals that see different case mixes by splitting every
class across the hospitals with proportions drawn from ``Dirichlet(alpha * 1_n)`` (Hsu, Qi,
Brown 2019; Li et al. "NIID-Bench" 2022): ``alpha -> 0`` gives each class to one hospital,
``alpha = 100`` is close to an i.i.d. split. CareFL uses it to measure how robust aggregation
behaves when honest hospitals disagree (``benchmarks/robustness_matrix.py --tasks cls``) and
ships it as ``carefl-partition`` so researchers can build the same consortia from any
MedMNIST-format ``.npz``::

    carefl-partition pooled.npz --hospitals 10 --alpha 0.5 --seed 0 --out sites/
    # -> sites/h00.npz ... sites/h09.npz, a class-count table, and the data.files override

Written here because neither MONAI nor Flower ships it for numpy arrays (``flwr-datasets`` has a
``DirichletPartitioner``, but it works on Hugging Face datasets and would add that stack).

How a split is drawn (numpy ``default_rng(seed)``, so the same inputs give the same files):

1. ``P[c] ~ Dirichlet(alpha * 1_n)`` for every class ``c``: hospital ``j`` gets the share
   ``P[c, j]`` of class ``c``.
2. The class's examples (shuffled) are cut at ``floor(cumsum(P[c]) * N_c)``: every example goes
   to exactly one hospital. The *same* ``P`` cuts the training and the test pool, so a
   hospital's test split has its own case mix (a local test, as at a real hospital).
3. A draw in which some hospital gets fewer than ``min_train`` training or ``min_test`` test
   examples is rejected and ``P`` drawn again (as NIID-Bench does). Rejection makes very small
   ``alpha`` slightly less extreme than the Dirichlet alone; the printed table shows the split
   actually used.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from carefl.errors import ConfigError, DataError

MAX_DRAWS = 10_000  # rejected Dirichlet draws before giving up (each costs microseconds)


def dirichlet_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    n_parts: int,
    alpha: float,
    seed: int,
    min_train: int = 10,
    min_test: int = 1,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-hospital index arrays into the train and test pools (see the module docstring).

    Args:
        train_labels, test_labels: int class labels, shapes ``(N_train,)`` and ``(N_test,)``.
        n_parts: hospitals n (>= 1). alpha: Dirichlet concentration (> 0).
        min_train, min_test: fewest examples any hospital may get in each split.

    Returns:
        ``(train_parts, test_parts)``: n sorted int64 index arrays each; together they cover
        each pool exactly once.

    Raises:
        ConfigError: a bad argument, or no draw in ``MAX_DRAWS`` gave every hospital
            ``min_train`` / ``min_test`` examples (the message says what to change).
    """
    if n_parts < 1:
        raise ConfigError(f"hospitals={n_parts} must be >= 1")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"alpha={alpha} must be a positive number (0.1 = strongly skewed, 100 = nearly i.i.d.)")
    if len(train_labels) < n_parts * min_train or len(test_labels) < n_parts * min_test:
        raise ConfigError(
            f"{len(train_labels)} training / {len(test_labels)} test examples cannot give {n_parts} hospitals "
            f"{min_train} / {min_test} each; use fewer hospitals or lower --min-train / --min-test"
        )
    rng = np.random.default_rng(seed)
    classes = np.union1d(np.unique(train_labels), np.unique(test_labels))
    # shuffled once: a redraw changes only the cut points, not the order within a class
    pools = {
        split: {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
        for split, labels in (("train", train_labels), ("test", test_labels))
    }
    for _ in range(MAX_DRAWS):
        shares = rng.dirichlet(np.full(n_parts, float(alpha)), size=len(classes))  # (C, n)
        parts = {split: _cut(pools[split], classes, shares, n_parts) for split in pools}
        if min(map(len, parts["train"])) >= min_train and min(map(len, parts["test"])) >= min_test:
            return parts["train"], parts["test"]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DRAWS} draws gave each of {n_parts} hospitals "
        f">= {min_train} training and >= {min_test} test examples; raise alpha, use fewer hospitals "
        "or lower --min-train / --min-test"
    )


def _cut(pool: dict, classes: np.ndarray, shares: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """Cut each class's shuffled indices at ``floor(cumsum(shares[c]) * N_c)``."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    for row, c in enumerate(classes):
        idx = pool[c]
        cuts = np.floor(np.cumsum(shares[row])[:-1] * len(idx)).astype(np.int64)
        for j, piece in enumerate(np.split(idx, cuts)):
            chunks[j].append(piece)
    return [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]


def class_table(labels: np.ndarray, parts: Sequence[np.ndarray], names: Sequence[str]) -> str:
    """A text table: one row per hospital, its example count per class and in total."""
    classes = np.unique(labels)
    head = "hospital " + " ".join(f"{int(c):>5d}" for c in classes) + "  total"
    rows = [head]
    for name, idx in zip(names, parts):
        counts = [int((labels[idx] == c).sum()) for c in classes]
        rows.append(f"{name:<8} " + " ".join(f"{k:>5d}" for k in counts) + f"  {len(idx):>5d}")
    return "\n".join(rows)


def read_pool(path: Path) -> dict[str, np.ndarray]:
    """train/test images and labels of a MedMNIST-format npz (val joins train); labels (N,) ints."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (a zip of named arrays, as np.savez writes)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in arrays]
    if missing:
        raise DataError(f"{path}: lacks {missing}; found {sorted(arrays)}")
    if "val_images" in arrays and "val_labels" in arrays:
        arrays["train_images"] = np.concatenate([arrays["train_images"], arrays["val_images"]])
        arrays["train_labels"] = np.concatenate([arrays["train_labels"], arrays["val_labels"]])
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"].reshape(len(arrays[f"{split}_images"]), -1)
        if labels.shape[1] != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: {split}_labels must hold one int class per image; got {labels.dtype} {labels.shape}")
        arrays[f"{split}_labels"] = labels[:, 0]
    return arrays


def write_parts(
    arrays: dict[str, np.ndarray], out: Path, names: Sequence[str],
    train_parts: Sequence[np.ndarray], test_parts: Sequence[np.ndarray],
) -> dict[str, Path]:
    """Write one MedMNIST-format npz per hospital into ``out``; returns ``{hospital: path}``
    (the ``data.files`` map). Each file is written under a temporary name and renamed, so an
    interrupted run leaves no half-written hospital file."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, tr, te in zip(names, train_parts, test_parts):
        path, tmp = out / f"{name}.npz", out / f".{name}.tmp.npz"
        np.savez_compressed(
            tmp, train_images=arrays["train_images"][tr], train_labels=arrays["train_labels"][tr],
            test_images=arrays["test_images"][te], test_labels=arrays["test_labels"][te],
        )
        tmp.replace(path)
        files[name] = path
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """carefl-partition: split a pooled MedMNIST-format .npz into label-skewed hospital files."""
    p = argparse.ArgumentParser(prog="carefl-partition", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("pooled", type=Path, help="npz with train_images/train_labels/test_images/test_labels")
    p.add_argument("--hospitals", default="10",
                   help="a count n (names h00..h<n-1>) or comma-separated hospital names (default 10)")
    p.add_argument("--alpha", type=float, required=True, help="Dirichlet concentration: 0.1 skewed .. 100 ~i.i.d.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-train", type=int, default=10, help="fewest training examples per hospital (default 10)")
    p.add_argument("--min-test", type=int, default=1, help="fewest test examples per hospital (default 1)")
    p.add_argument("--out", type=Path, required=True, help="folder for <hospital>.npz")
    args = p.parse_args(argv)
    names = ([f"h{i:02d}" for i in range(int(args.hospitals))] if args.hospitals.isdigit()
             else [n.strip() for n in args.hospitals.split(",") if n.strip()])
    try:
        arrays = read_pool(args.pooled)
        train_parts, test_parts = dirichlet_split(
            arrays["train_labels"], arrays["test_labels"], len(names), args.alpha, args.seed,
            args.min_train, args.min_test,
        )
    except (ConfigError, DataError) as e:
        print(f"carefl-partition: {e}", file=sys.stderr)
        return 2
    files = write_parts(arrays, args.out, names, train_parts, test_parts)
    print(f"training examples per class (Dirichlet alpha={args.alpha}, seed={args.seed}):")
    print(class_table(arrays["train_labels"], train_parts, names))
    classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    print("\nsimulate them with:")
    print(f"  carefl-sim task=cls2d model=classifier data=medmnist task.num_classes={classes} "
          f"'federation.hospitals=[{','.join(names)}]' "
          "'+data.files={" + ",".join(f"{n}:\"{path}\"" for n, path in files.items()) + "}'")
    return 0
