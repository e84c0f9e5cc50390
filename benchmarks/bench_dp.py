"""Cost of DP-SGD per model: CPU time of one DP step over one plain step on the same batch.

    .venv/bin/python benchmarks/bench_dp.py                 # 2D: batch 16, 64x64, 1 channel
    .venv/bin/python benchmarks/bench_dp.py --dims 3        # 3D: batch 4, 32^3, UNet + classifier
    .venv/bin/python benchmarks/bench_dp.py --batch 64 --modes bk --models classifier,densenet121
    .venv/bin/python benchmarks/bench_dp.py --tiny          # smoke: batch 2, smallest input
    git show <commit>:carefl/dp_bk.py > /tmp/ref_bk.py      # before/after a change of the engine:
    .venv/bin/python benchmarks/bench_dp.py --modes bk --ref /tmp/ref_bk.py   # adds mode bk_ref
    .venv/bin/python benchmarks/bench_dp.py --modes hooks,ew --out /tmp/bench.json

For every conf/model/*.yaml (on the task of its kind with --dims spatial dims) and every
Opacus per-sample gradient mode, one "step" is forward + loss + backward + optimizer.step
(SGD); the DP step also computes per-sample gradients, clips them and adds noise (Opacus
DPOptimizer, sigma=1, C=1). The plain step and every mode's DP step run interleaved (plain,
mode 1, mode 2, ..., plain, ...) and are timed in process CPU time, so a load that comes and
goes on a shared machine hits all of them alike; ratio = median DP / median plain. Prints a
table and writes JSON with the load average before and after (default
benchmarks/results/bench_dp.json).
Modes: hooks (Opacus' default backward hooks), functorch (torch.func vmap per-sample
grads), ew (PyTorch ExpandedWeights), ghost (Opacus fast gradient clipping: two backward
passes, fast norms only for Linear/Embedding), bk (CareFL's book-keeping engine,
carefl.dp_bk: one backward, exact clipping, Opacus' noise and accountant).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import sys
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from carefl.dp_bk import BKPrivacyEngine
from carefl.errors import ConfigError
from carefl.models import build_model, spatial_multiple

ROOT = Path(__file__).resolve().parent.parent
MODES = ("hooks", "functorch", "ew", "ghost", "bk")


def _task_for(model_cfg, dims: int) -> tuple[str, dict]:
    """The ``dims``-D task file whose kind the model solves (tried in name order)."""
    for path in sorted(glob.glob(str(ROOT / "conf/task/*.yaml"))):
        task = OmegaConf.load(path)
        if task.spatial_dims != dims:
            continue
        try:
            build_model(OmegaConf.create({"model": model_cfg, "task": task, "seed": 0}))
        except ConfigError:  # the model solves the other task kind
            continue
        return Path(path).stem, task
    raise SystemExit(f"no {dims}D task in conf/task/ fits model={model_cfg.name}")


def _criterion(task):
    return torch.nn.BCEWithLogitsLoss() if task.kind == "segmentation" else torch.nn.CrossEntropyLoss()


def _batch(task, batch: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spatial = [side] * task.spatial_dims
    x = torch.randn(batch, task.in_channels, *spatial, generator=g)
    if task.kind == "segmentation":
        y = (torch.rand(batch, task.num_classes, *spatial, generator=g) > 0.5).float()
    else:
        y = torch.randint(0, task.num_classes, (batch,), generator=g)
    return x, y


def _interleaved_cpu_ms(steps: dict, warmup: int, repeat: int) -> dict:
    """{name: median CPU ms} of the steps, run in turn ``repeat`` times after ``warmup`` rounds;
    a step that raises is dropped and reported as {name: exception}."""
    times: dict = {name: [] for name in steps}
    for i in range(warmup + repeat):
        for name, step in steps.items():
            if isinstance(times[name], Exception):
                continue
            t0 = time.process_time()
            try:
                step()
            except Exception as e:  # a mode that cannot handle a net is a result, not a crash
                times[name] = e
                continue
            if i >= warmup:
                times[name].append(time.process_time() - t0)
    return {name: t if isinstance(t, Exception) else 1e3 * statistics.median(t) for name, t in times.items()}


def _plain_step(model, criterion, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        opt.step()

    return step


_ENGINES = {"bk": BKPrivacyEngine}  # mode -> engine class; --ref adds "bk_ref"


def _load_ref(path: Path) -> None:
    """Mode bk_ref: the BKPrivacyEngine of another copy of carefl/dp_bk.py (e.g. before a change)."""
    spec = importlib.util.spec_from_file_location("dp_bk_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dp_bk_ref"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    _ENGINES["bk_ref"] = module.BKPrivacyEngine


def _dp_step(model, criterion, x, y, mode: str):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    out = _ENGINES.get(mode, PrivacyEngine)(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, criterion=criterion,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True,
        grad_sample_mode="bk" if mode in _ENGINES else mode,
    )
    if mode == "ghost":
        dp_model, dp_opt, dp_crit, _ = out
    else:
        (dp_model, dp_opt, _), dp_crit = out, criterion

    def step():
        dp_opt.zero_grad(set_to_none=True)
        dp_crit(dp_model(x), y).backward()
        dp_opt.step()

    return step


def run(dims: int, models: list[str], batch: int, side: int | None, modes: list[str], warmup: int,
        repeat: int) -> list[dict]:
    rows = []
    for name in models:
        model_cfg = OmegaConf.load(ROOT / f"conf/model/{name}.yaml")
        task_name, task = _task_for(model_cfg, dims)
        s = side or spatial_multiple(model_cfg)
        x, y = _batch(task, batch, s)
        criterion = _criterion(task)
        cfg = OmegaConf.create({"model": model_cfg, "task": task, "seed": 0})
        steps = {"plain": _plain_step(build_model(cfg), criterion, x, y)}
        for mode in modes:
            try:
                steps[mode] = _dp_step(build_model(cfg), criterion, x, y, mode)
            except Exception as e:
                steps[mode] = e
        ms = _interleaved_cpu_ms({k: v for k, v in steps.items() if not isinstance(v, Exception)}, warmup, repeat)
        plain_ms = ms["plain"]
        for mode in modes:
            row = {"model": model_cfg.name, "task": task_name, "mode": mode, "batch": batch,
                   "side": s, "plain_ms": round(plain_ms, 2)}
            dp_ms = steps[mode] if isinstance(steps[mode], Exception) else ms[mode]
            if isinstance(dp_ms, Exception):
                row |= {"dp_ms": None, "ratio": None, "error": f"{type(dp_ms).__name__}: {str(dp_ms)[:160]}"}
            else:
                row |= {"dp_ms": round(dp_ms, 2), "ratio": round(dp_ms / plain_ms, 3), "error": None}
            rows.append(row)
            print(f"{row['model']:<12} {row['task']:<6} {mode:<10} {plain_ms:9.1f} "
                  f"{row['dp_ms'] if row['dp_ms'] is not None else '-':>9} "
                  f"{row['ratio'] if row['ratio'] is not None else row['error']}", flush=True)
    return rows


def _loadavg() -> str:
    """1, 5 and 15 minute load averages (Linux), or '?'."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: batch 2, smallest input, 1 repeat")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="spatial dims of the task")
    p.add_argument("--models", default=None,
                   help="comma list of conf/model names (default: all in 2D, unet,classifier in 3D)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 in 2D, 4 in 3D)")
    p.add_argument("--side", type=int, default=None, help="image side (default 64 in 2D, 32 in 3D)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeat", type=int, default=7, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds of steps first")
    p.add_argument("--ref", type=Path, default=None,
                   help="another carefl/dp_bk.py: adds mode bk_ref, timed interleaved with the others")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_dp.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore", UserWarning)  # Opacus' per-call hook / secure-RNG notices
    modes = [m for m in a.modes.split(",") if m]
    if a.ref:
        _load_ref(a.ref)
        modes.append("bk_ref")
    models = a.models.split(",") if a.models else (
        sorted(Path(p).stem for p in glob.glob(str(ROOT / "conf/model/*.yaml"))) if a.dims == 2
        else ["unet", "classifier"])
    batch, side, warmup, repeat = (2, None, 0, 1) if a.tiny else (
        a.batch or (16 if a.dims == 2 else 4), a.side or (64 if a.dims == 2 else 32), a.warmup, a.repeat)
    load_before = _loadavg()
    print(f"load average {load_before}; CPU time per step, interleaved")
    print(f"{'model':<12} {'task':<6} {'mode':<10} {'plain_ms':>9} {'dp_ms':>9} ratio (dp/plain)")
    rows = run(a.dims, models, batch, side, modes, warmup, repeat)
    load_after = _loadavg()
    print(f"load average {load_after}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "torch": torch.__version__, "threads": a.threads, "dims": a.dims, "batch": batch, "repeat": repeat,
        "clock": "process CPU time, steps interleaved", "loadavg_before": load_before,
        "loadavg_after": load_after, "results": rows,
    }, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
