"""A hospital's data step on real files at native resolution: first round (empty disk cache) vs later rounds.

    .venv/bin/python benchmarks/bench_data.py                        # 2000 PNG pairs, 50 NIfTI 128^3
    .venv/bin/python benchmarks/bench_data.py --tiny                # smoke: 12 PNG pairs, 2 NIfTI 32^3
    .venv/bin/python benchmarks/bench_data.py --repeat 3 --out /tmp/bench_data.json
    .venv/bin/python benchmarks/bench_data.py --n2d 500 --n3d 20 --side 96 --workdir /data/bench

Two Decathlon-style datasets are generated once into ``--workdir`` (kept there and reused by
later runs with the same sizes), each with its datalist JSON (90 % training, 10 % test):

- ``seg2d``: ``--n2d`` PNG pairs of 256x256, uint8 image and mask 0/1/2 (``task=seg2d``,
  ``task.num_classes=3``, preset ``png2d``, patches of 64x64);
- ``seg3d``: ``--n3d`` NIfTI volumes of ``--side``^3 at 1 mm, float32 image and uint8 label 0..2
  (``task=seg3d``, preset ``mri``, patches of 32^3).

Content is a disc/sphere of class 1 and a block of class 2 on noise: enough for the patch
sampler and the presets to do their normal work; the figures do not depend on it much.

Every measured round runs in a fresh Python process (``--child``), as Flower runs a fresh
ClientApp process per message, so no in-process cache helps; it uses one torch thread
(``federation.torch_threads``, as a hospital does). The **data step** of a round is what a
hospital does before and besides training: ``carefl.data.load_hospital`` (read, check and
preprocess every record into the hospital's disk cache, or find it already there) plus one
full pass over the training set (``hd.train[i]`` for every i: one padded, cropped
patch per record, as one epoch draws) and over the test set (whole images at native size).

- **first round**: the cache directory is emptied first, so every record is read from its
  files, checked and preprocessed, then written as one ``.pt`` per record;
- **later round**: a new process with the cache filled; records are only looked up and loaded
  back (``--repeat`` such rounds; min and median reported).

Figures: wall and CPU time (``time.process_time``, all threads) of the data step, the ratio
first / later (median) wall time, the child's peak RSS (``ru_maxrss``, imports included), the
cache's size on disk, and the 1-minute load average at the start and end of each dataset's
measurements (the machine may be shared: compare wall with CPU time). A second table splits
the step into ``load_hospital``, the training pass and the test pass, and gives the process's
import time (torch, MONAI, CareFL), which every fresh ClientApp process pays on top (the
training pass there reads ``hd.train[i]``: one patch per record, without the augmentation, which
runs on batches). The first later round also times, after its data step, one epoch's data work
alone (every batch of the training loader: patch draws, collation and the preset's augmentation
on the batch, no model) and one local epoch of the configured small UNet without DP and with
DP-SGD (the hospital's own ``make_private``: Poisson loader, per-sample gradients). "data share"
of a later round = (``load_hospital`` + that data work) / (``load_hospital`` + the epoch): one
process, one thread, no overlap of data and compute.

Last, **whole later rounds** as a hospital serves them: the child calls
:func:`carefl.hospital.handle` -- the ClientApp's own entry point -- with a real SuperNode node
config (DP-SGD, the hospital's ``data-workers`` 0 or 1, one torch thread) for a train and then an
evaluate message, each in a fresh process as Flower runs them. Round 1 fills the cache and plans
the noise; later rounds are timed from the process's first import to its reply. Data seconds are
``load_hospital``, every wait of a ``DataLoader`` (its iterator's start, which forks the
workers, and each ``next``) and the test records the sliding-window evaluation reads outside a
loader (:class:`_DataClock` patches those entry points in the child only). "data share of the
round" = data seconds of both processes / their wall seconds; "after imports" leaves the
imports (~5 s per process) out of the denominator.

Caveat: the source files were just written and the cache just filled, so both are most likely
in the OS page cache; a first read from a cold hospital disk or network share can be slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: the hospital name the datasets are loaded under
HOSPITAL = "bench"
#: fraction of each generated dataset listed as training records (the rest are the test list)
TRAIN_FRACTION = 0.9
#: side of the generated PNG images (pixels)
SIDE_2D = 256
#: config overrides per dataset kind (the datalist comes in as the SuperNode's data-path)
OVERRIDES = {
    "seg2d": ["task=seg2d", "data=decathlon", "data.preprocess=png2d", "data.spatial_size=[64,64]",
              "task.num_classes=3", f"federation.hospitals=[{HOSPITAL}]", "federation.min_hospitals=1"],
    "seg3d": ["task=seg3d", "data=decathlon", "data.preprocess=mri", "data.spatial_size=[32,32,32]",
              "task.num_classes=3", f"federation.hospitals=[{HOSPITAL}]", "federation.min_hospitals=1",
              "model.channels=[8,16]", "model.strides=[2]"],
}
#: rounds a whole-round measurement plans (its later rounds are numbered 2, 3, ...; the last
#: would also draw the explanation gallery, so it is never reached)
ROUNDS = 20
#: line prefix of a child's result on stdout
RESULT = "BENCH_DATA_RESULT "


# ---- data generation ----------------------------------------------------------------------


def _label_map(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 label map: one ball of class 1 and one axis-aligned block of class 2 (the block wins)."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    side = min(shape)
    label = np.zeros(shape, dtype=np.uint8)
    centre = rng.uniform(0.25, 0.75, len(shape)) * np.array(shape)
    radius = rng.uniform(side / 10, side / 5)
    label[sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2] = 1
    size = rng.integers(side // 10, side // 4 + 1, len(shape))
    start = [int(rng.integers(0, s - w)) for s, w in zip(shape, size)]
    label[tuple(slice(a, a + w) for a, w in zip(start, size))] = 2
    return label


def _split(files: list[dict]) -> dict:
    """Datalist dict: the first :data:`TRAIN_FRACTION` of ``files`` for training, the rest for test."""
    n_train = min(max(1, round(TRAIN_FRACTION * len(files))), len(files) - 1)
    return {"training": files[:n_train], "test": files[n_train:]}


def _write_dataset(directory: Path, n: int, write_pair, what: str) -> Path:
    """Write ``n`` pairs with ``write_pair(i) -> {"image", "label"}`` and the datalist (written
    last, so its presence means the dataset is complete); an existing datalist is kept."""
    datalist = directory / "datalist.json"
    if datalist.is_file():
        print(f"{what}: reusing {directory}", flush=True)
        return datalist
    directory.mkdir(parents=True, exist_ok=True)
    start, files = time.perf_counter(), []
    for i in range(n):
        files.append(write_pair(i))
        if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
            print(f"{what}: wrote {i + 1}/{n} pairs ({time.perf_counter() - start:.0f} s)", flush=True)
    datalist.write_text(json.dumps(_split(files), indent=1))
    return datalist


def generate_2d(directory: Path, n: int, seed: int = 0) -> Path:
    """``n`` 256x256 PNG pairs (uint8 image, mask 0/1/2) and their datalist; returns its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def write_pair(i: int) -> dict:
        label = _label_map(rng, (SIDE_2D, SIDE_2D))
        image = 40.0 + 80.0 * (label == 1) + 150.0 * (label == 2) + rng.normal(0.0, 20.0, label.shape)
        names = {"image": f"img{i:05d}.png", "label": f"lab{i:05d}.png"}
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(directory / names["image"])
        Image.fromarray(label).save(directory / names["label"])
        return names

    return _write_dataset(directory, n, write_pair, "seg2d")


def generate_3d(directory: Path, n: int, side: int, seed: int = 0) -> Path:
    """``n`` NIfTI pairs of ``side``^3 at 1 mm (float32 image, uint8 label 0..2) and their
    datalist; returns its path."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    affine = np.eye(4)  # 1 mm isotropic, RAS

    def write_pair(i: int) -> dict:
        label = _label_map(rng, (side, side, side))
        image = (100.0 + 200.0 * (label == 1) + 400.0 * (label == 2)
                 + rng.normal(0.0, 30.0, label.shape)).astype(np.float32)
        names = {"image": f"img{i:04d}.nii.gz", "label": f"lab{i:04d}.nii.gz"}
        nib.save(nib.Nifti1Image(image, affine), directory / names["image"])
        nib.save(nib.Nifti1Image(label, affine), directory / names["label"])
        return names

    return _write_dataset(directory, n, write_pair, "seg3d")


# ---- one round's data step in this process (--child) --------------------------------------


def _data_pass(cfg, train) -> float:
    """Wall seconds of one epoch's data work alone: every batch the training loader yields
    (one patch per record, collated, the preset's augmentation on the batch), no model."""
    from carefl.training import make_loader

    start = time.perf_counter()
    for _ in make_loader(train, cfg.federation.batch_size, 0):
        pass
    return time.perf_counter() - start


class _WaitTimed:
    """A loader whose iteration adds up the seconds the training loop waits for each batch."""

    def __init__(self, loader) -> None:
        self.loader, self.dataset, self.wait_s = loader, loader.dataset, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait_s += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def _one_local_epoch(cfg, train, dp: bool, workers: int = 0) -> tuple[float, float]:
    """``(epoch, wait)`` wall seconds of one local epoch (``federation.batch_size``) on the
    configured model, data draws included, and of its waits for the next batch; ``dp``: DP-SGD
    as a hospital runs it (the Poisson loader, ``cfg.privacy``'s clip bound and per-sample-gradient
    mode, sigma 1.0: the noise level does not change the time); ``workers``: the hospital's
    ``data-workers`` (batches built in worker processes while the model trains)."""
    from carefl.models import build_model
    from carefl.training import make_loader, make_optimizer, train_epochs

    model = build_model(cfg)
    optimizer = make_optimizer(model, cfg.federation.optimizer, cfg.federation.lr)
    loader = make_loader(train, cfg.federation.batch_size, 0, workers=workers)
    if dp:
        from carefl.hospital import make_private

        model, optimizer, loader, _ = make_private(cfg, model, optimizer, loader, 1.0, [])
    timed = _WaitTimed(loader)
    start = time.perf_counter()
    train_epochs(model, optimizer, timed, cfg.task, 1)
    return time.perf_counter() - start, timed.wait_s


def child(kind: str, datalist: Path, cache_dir: Path, with_epoch: bool = False) -> dict:
    """Time the data step of one round in this (fresh) process (and, ``with_epoch``, one local
    training epoch after it); returns the figures."""
    t0 = time.perf_counter()
    import torch

    import carefl.data.decathlon  # noqa: F401 - MONAI: every hospital process imports it for its model
    import carefl.hospital  # noqa: F401 - what a hospital process imports (and its gc.freeze)
    from carefl.config import compose_config
    from carefl.data import load_hospital

    imports_s = time.perf_counter() - t0
    cfg = compose_config(OVERRIDES[kind])
    torch.set_num_threads(int(cfg.federation.torch_threads))
    wall, cpu = time.perf_counter(), time.process_time()
    hd = load_hospital(cfg, HOSPITAL, 0, data_path=str(datalist), cache_dir=cache_dir)
    load_s = time.perf_counter() - wall
    mark = time.perf_counter()
    for i in range(len(hd.train)):
        hd.train[i]
    train_s = time.perf_counter() - mark
    mark = time.perf_counter()
    for i in range(len(hd.test)):
        hd.test[i]
    test_s = time.perf_counter() - mark
    wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    epochs = {}
    if with_epoch:  # epoch_s: without DP; dp_epoch_s: DP-SGD; *_wait_s: its waits for batches; _w1: data-workers=1
        epochs = {"data_pass_s": _data_pass(cfg, hd.train)}
        for key, dp, workers in (("epoch", False, 0), ("dp_epoch", True, 0), ("dp_epoch_w1", True, 1)):
            epochs[f"{key}_s"], epochs[f"{key}_wait_s"] = _one_local_epoch(cfg, hd.train, dp, workers)
    return {"imports_s": imports_s, "wall_s": wall_s, "cpu_s": cpu_s, "epoch_s": None, **epochs,
            "load_hospital_s": load_s, "train_pass_s": train_s, "test_pass_s": test_s,
            "train_records": len(hd.train), "test_records": len(hd.test),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _DataClock:
    """Seconds this process spends on data inside a hospital's real request handler: its
    ``load_hospital`` calls, the training loop's waits for each batch (``DataLoader`` iterator
    start, which forks the ``data-workers``, and every ``next``), and the evaluation's reads of
    test records outside any loader. Installed by patching those entry points in the benchmark's
    child process only, so the figure comes from :func:`carefl.hospital.handle` unchanged."""

    def __init__(self) -> None:
        self.load_s = self.wait_s = self.read_s = 0.0
        self._in_loader = False

    def install(self) -> None:
        from torch.utils.data import DataLoader
        from torch.utils.data import dataloader as dl

        import carefl.hospital as hospital
        from carefl.data.decathlon import Records

        def timed(fn, field: str, skip_in_loader: bool = False):
            def wrapper(*args, **kwargs):
                if skip_in_loader and self._in_loader:
                    return fn(*args, **kwargs)
                outer, self._in_loader = self._in_loader, True
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - start)
                    self._in_loader = outer
            return wrapper

        hospital._data = timed(hospital._data, "load_s")
        DataLoader.__iter__ = timed(DataLoader.__iter__, "wait_s")
        dl._BaseDataLoaderIter.__next__ = timed(dl._BaseDataLoaderIter.__next__, "wait_s")
        Records.__getitem__ = timed(Records.__getitem__, "read_s", skip_in_loader=True)

    @property
    def total_s(self) -> float:
        return self.load_s + self.wait_s + self.read_s


def round_child(kind: str, datalist: Path, cache_dir: Path, state_dir: Path, message: str, server_round: int,
                workers: int) -> dict:
    """One message of a real round, as a SuperNode's fresh ClientApp process serves it:
    :func:`carefl.hospital.handle` with a real node config (DP-SGD, the hospital's
    ``data-workers``), timed from this process's first import to its reply; returns the
    process's wall seconds, its imports and the data seconds of :class:`_DataClock`."""
    t0 = time.perf_counter()
    import torch

    import carefl.hospital as hospital
    from carefl.config import compose_config
    from carefl.models import build_model
    from carefl.request import build_request

    imports_s = time.perf_counter() - t0
    clock = _DataClock()
    clock.install()
    cfg = compose_config([*OVERRIDES[kind], f"federation.rounds={ROUNDS}", f"output_dir={state_dir.parent}"])
    node = {"hospital": HOSPITAL, "data-path": str(datalist), "state-dir": str(state_dir), "epsilon-cap": 100.0,
            "delta": 1e-5, "cache-dir": str(cache_dir), "data-workers": workers, "torch-threads": 1}
    state = build_model(cfg).state_dict()
    reply = hospital.handle(message, build_request(cfg, server_round, "ab" * 32, None, None), state, node)
    if reply.status != "ok":
        raise RuntimeError(f"the hospital did not serve {message} round {server_round}: {reply.reason}")
    wall_s = time.perf_counter() - t0
    return {"message": message, "round": server_round, "workers": workers, "wall_s": wall_s, "imports_s": imports_s,
            "data_s": clock.total_s, "load_hospital_s": clock.load_s, "batch_wait_s": clock.wait_s,
            "test_read_s": clock.read_s, "share": clock.total_s / wall_s,
            "share_after_imports": clock.total_s / (wall_s - imports_s)}


def run_round_child(kind: str, datalist: Path, cache_dir: Path, state_dir: Path, message: str, server_round: int,
                    workers: int) -> dict:
    """:func:`round_child` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, __file__, "--round-child", kind, str(datalist), str(cache_dir),
                           str(state_dir), message, str(server_round), str(workers)],
                          stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"round child {kind} printed no result; stdout:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


def measure_rounds(kind: str, datalist: Path, cache_dir: Path, repeat: int) -> list[dict]:
    """Whole later rounds through the hospital's own handler: round 1 fills the cache and plans
    the noise (not reported), then for ``data-workers`` 0 and 1, ``repeat`` times interleaved,
    a train and an evaluate message, each in its own fresh process as Flower serves them."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"bench-data-{kind}-")) / "hospital"
    print(f"{kind}: whole rounds through carefl.hospital.handle (state {state_dir})", flush=True)
    run_round_child(kind, datalist, cache_dir, state_dir, "train", 1, 0)
    rows, server_round = [], 1
    for _ in range(repeat):
        for workers in (0, 1):
            server_round += 1
            for message in ("train", "evaluate"):
                rows.append({"dataset": kind, **run_round_child(kind, datalist, cache_dir, state_dir, message,
                                                                 server_round, workers)})
    shutil.rmtree(state_dir.parent, ignore_errors=True)
    return rows


def _rounds_table(rows: list[dict]) -> str:
    """Per dataset and data-workers: median over repeats of each message, and of the round
    (train + evaluate processes together)."""
    out = ["| dataset | data-workers | message | process wall s | imports s | load_hospital s | batch waits s "
           "| test reads s | data share of the process | share after imports |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dataset"], r["workers"]) for r in rows})
    for dataset, workers in keys:
        mine = [r for r in rows if r["dataset"] == dataset and r["workers"] == workers]
        for message in ("train", "evaluate"):
            msg = [r for r in mine if r["message"] == message]
            med = {k: statistics.median(r[k] for r in msg) for k in ("wall_s", "imports_s", "load_hospital_s",
                                                                     "batch_wait_s", "test_read_s", "share",
                                                                     "share_after_imports")}
            out.append(f"| {dataset} | {workers} | {message} | {med['wall_s']:.2f} | {med['imports_s']:.2f} "
                       f"| {med['load_hospital_s']:.2f} | {med['batch_wait_s']:.2f} | {med['test_read_s']:.2f} "
                       f"| {med['share']:.1%} | {med['share_after_imports']:.1%} |")
        per_round = []  # (data s, wall s, wall s after imports) of each round's two processes together
        for n in sorted({r["round"] for r in mine}):
            both = [r for r in mine if r["round"] == n]
            per_round.append((sum(r["data_s"] for r in both), sum(r["wall_s"] for r in both),
                              sum(r["wall_s"] - r["imports_s"] for r in both)))
        out.append(f"| {dataset} | {workers} | **round** | {statistics.median(w for _, w, _ in per_round):.2f} | | | | "
                   f"| **{statistics.median(d / w for d, w, _ in per_round):.1%}** "
                   f"| {statistics.median(d / a for d, _, a in per_round):.1%} |")
    return "\n".join(out)


def run_child(kind: str, datalist: Path, cache_dir: Path, with_epoch: bool = False) -> dict:
    """:func:`child` in a fresh interpreter (its log lines pass through to stderr)."""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(datalist), str(cache_dir),
                           *(["--with-epoch"] if with_epoch else [])],
                          stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"child {kind} printed no result; stdout:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


# ---- the benchmark --------------------------------------------------------------------------


def _size_mib(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2 ** 20


def measure(kind: str, datalist: Path, cache_dir: Path, repeat: int) -> dict:
    """First round (emptied cache) then ``repeat`` later rounds, each in a fresh process."""
    load_start = os.getloadavg()
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"{kind}: first round (empty cache {cache_dir})", flush=True)
    first = run_child(kind, datalist, cache_dir)
    cache_mib, prepared = _size_mib(cache_dir), _entries(cache_dir)
    later = []
    for r in range(repeat):
        print(f"{kind}: later round {r + 1}/{repeat}", flush=True)
        later.append(run_child(kind, datalist, cache_dir, with_epoch=r == 0))
    rewritten = sum(1 for path, stamp in _entries(cache_dir).items() if prepared.get(path) != stamp)
    return {"dataset": kind, "first": first, "later": later, "cache_mib": cache_mib, "cache_entries": len(prepared),
            "later_rewrote": rewritten, "load_start": load_start, "load_end": os.getloadavg()}


def _entries(cache_dir: Path) -> dict[str, int]:
    """Every prepared record's file in a cache with its modification time (ns): what a later round
    must not rewrite (the data card, ``data_card.json``, is written again by every load)."""
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in cache_dir.rglob("*")
            if p.is_file() and p.name != "data_card.json"}


def _table(results: list[dict]) -> str:
    rows = ["| dataset | records (train + test) | first round: wall s | first round: CPU s "
            "| later round: wall s (min / median) | later round: CPU s (median) | first / later "
            "| peak RSS MiB (first / later) | cache MiB | load 1-min (start / end) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        first, later = res["first"], res["later"]
        walls = [r["wall_s"] for r in later]
        median = statistics.median(walls)
        rows.append(
            f"| {res['dataset']} | {first['train_records']} + {first['test_records']} | {first['wall_s']:.1f} "
            f"| {first['cpu_s']:.1f} | {min(walls):.2f} / {median:.2f} "
            f"| {statistics.median(r['cpu_s'] for r in later):.2f} | {first['wall_s'] / median:.1f}x "
            f"| {first['peak_rss_mib']:.0f} / {max(r['peak_rss_mib'] for r in later):.0f} "
            f"| {res['cache_mib']:.0f} | {res['load_start'][0]:.2f} / {res['load_end'][0]:.2f} |")
    rows += ["", "| dataset | round | load_hospital s | training pass s | test pass s | imports s |",
             "|---|---|---|---|---|---|"]
    for res in results:
        for name, runs in (("first", [res["first"]]), ("later (median)", res["later"])):
            cell = {k: statistics.median(r[k] for r in runs)
                    for k in ("load_hospital_s", "train_pass_s", "test_pass_s", "imports_s")}
            rows.append(f"| {res['dataset']} | {name} | {cell['load_hospital_s']:.2f} | {cell['train_pass_s']:.2f} "
                        f"| {cell['test_pass_s']:.2f} | {cell['imports_s']:.1f} |")
    rows += ["", "| dataset, later round | load_hospital s | one epoch's data (loader, no model) s "
             "| epoch no DP s | data share no DP | epoch DP-SGD s | data share DP |", "|---|---|---|---|---|---|---|"]
    for res in results:
        r = next((r for r in res["later"] if r.get("dp_epoch_s")), None)
        if r is None:
            continue
        data = r["load_hospital_s"] + r["data_pass_s"]
        rows.append(f"| {res['dataset']} | {r['load_hospital_s']:.2f} | {r['data_pass_s']:.2f} | {r['epoch_s']:.1f} "
                    f"| {data / (r['load_hospital_s'] + r['epoch_s']):.1%} | {r['dp_epoch_s']:.1f} "
                    f"| {data / (r['load_hospital_s'] + r['dp_epoch_s']):.1%} |")
    rows += ["", "DP-SGD epoch of a later round, measured inside training: the seconds the loop waits for its next "
             "batch, without and with one worker process (the hospital's data-workers=1)", "",
             "| dataset | epoch s | waits s | data share | epoch, 1 worker s | waits s | data share |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        r = next((r for r in res["later"] if r.get("dp_epoch_w1_s")), None)
        if r is not None:
            base, one = r["load_hospital_s"], r["dp_epoch_w1_s"]
            rows.append(f"| {res['dataset']} | {r['dp_epoch_s']:.1f} | {r['dp_epoch_wait_s']:.2f} "
                        f"| {(base + r['dp_epoch_wait_s']) / (base + r['dp_epoch_s']):.1%} | {one:.1f} "
                        f"| {r['dp_epoch_w1_wait_s']:.2f} | {(base + r['dp_epoch_w1_wait_s']) / (base + one):.1%} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n2d", type=int, default=2000, help="PNG image/mask pairs (default 2000)")
    parser.add_argument("--n3d", type=int, default=50, help="NIfTI volume pairs (default 50)")
    parser.add_argument("--side", type=int, default=128, help="side of the NIfTI volumes in voxels (default 128)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "carefl-bench-data",
                        help="where datasets and caches live; datasets there are reused (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="later rounds to run (min / median reported)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: --n2d 12 --n3d 2 --side 32")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DATALIST", "CACHE_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--with-epoch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--round-child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
        logging.getLogger("carefl.data").setLevel(logging.INFO)  # progress lines of long preparations
        kind, datalist, cache_dir = args.child
        print(RESULT + json.dumps(child(kind, Path(datalist), Path(cache_dir), args.with_epoch)), flush=True)
        return
    if args.round_child:
        logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
        kind, datalist, cache_dir, state_dir, message, server_round, workers = args.round_child
        print(RESULT + json.dumps(round_child(kind, Path(datalist), Path(cache_dir), Path(state_dir), message,
                                              int(server_round), int(workers))), flush=True)
        return
    if args.tiny:
        args.n2d, args.n3d, args.side = 12, 2, 32
    if args.n2d < 2 or args.n3d < 2 or args.side < 16 or args.repeat < 1:
        parser.error("need --n2d >= 2, --n3d >= 2 (a training and a test record), --side >= 16, --repeat >= 1")

    load_start = os.getloadavg()
    work = args.workdir
    datalists = {"seg2d": generate_2d(work / f"seg2d-n{args.n2d}-{SIDE_2D}", args.n2d),
                 "seg3d": generate_3d(work / f"seg3d-n{args.n3d}-{args.side}", args.n3d, args.side)}
    results = [measure(kind, path, work / f"cache-{path.parent.name}", args.repeat)
               for kind, path in datalists.items()]
    rounds = [row for kind, path in datalists.items()
              for row in measure_rounds(kind, path, work / f"cache-{path.parent.name}", args.repeat)]
    load_end = os.getloadavg()

    print(f"\nData step per round, fresh process each (nproc {os.cpu_count()}, {args.repeat} later round(s)):\n")
    print(_table(results))
    print("\nWhole later rounds through carefl.hospital.handle (DP-SGD, one torch thread), each message in a "
          "fresh process from its first import to its reply; data = load_hospital + the loaders' waits + test "
          "reads outside a loader; median of the repeats:\n")
    print(_rounds_table(rounds))
    print(f"\nload average (1, 5, 15 min): start {' '.join(f'{x:.2f}' for x in load_start)}, "
          f"end {' '.join(f'{x:.2f}' for x in load_end)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items() if k != "child"},
                                         "nproc": os.cpu_count(), "load_start": load_start, "load_end": load_end,
                                         "results": results, "rounds": rounds}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
