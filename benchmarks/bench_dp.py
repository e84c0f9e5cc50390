"""Cost of DP-SGD per model: median time of one DP step vs one plain step on the same batch.

    .venv/bin/python benchmarks/bench_dp.py                 # batch 16, 64x64, 1 channel
    .venv/bin/python benchmarks/bench_dp.py --tiny          # smoke: batch 2, smallest input
    .venv/bin/python benchmarks/bench_dp.py --modes hooks,ew --out /tmp/bench.json

For every conf/model/*.yaml (on the 2D task of its kind) and every Opacus per-sample
gradient mode, one "step" is forward + loss + backward + optimizer.step (SGD); the DP step
also computes per-sample gradients, clips them and adds noise (Opacus DPOptimizer, sigma=1,
C=1). Prints a table and writes JSON (default benchmarks/results/bench_dp.json).
Modes: hooks (Opacus' default backward hooks), functorch (torch.func vmap per-sample
grads), ew (PyTorch ExpandedWeights), ghost (Opacus fast gradient clipping: two backward
passes, fast norms only for Linear/Embedding), bk (CareFL's book-keeping engine,
carefl.dp_bk: one backward, exact clipping, Opacus' noise and accountant).
"""

from __future__ import annotations

import argparse
import glob
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


def _task_for(model_cfg) -> tuple[str, dict]:
    """The 2D task file whose kind the model solves (tried in name order)."""
    for path in sorted(glob.glob(str(ROOT / "conf/task/*.yaml"))):
        task = OmegaConf.load(path)
        if task.spatial_dims != 2:
            continue
        try:
            build_model(OmegaConf.create({"model": model_cfg, "task": task, "seed": 0}))
        except ConfigError:  # the model solves the other task kind
            continue
        return Path(path).stem, task
    raise SystemExit(f"no 2D task in conf/task/ fits model={model_cfg.name}")


def _criterion(task):
    return torch.nn.BCEWithLogitsLoss() if task.kind == "segmentation" else torch.nn.CrossEntropyLoss()


def _batch(task, batch: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, task.in_channels, side, side, generator=g)
    if task.kind == "segmentation":
        y = (torch.rand(batch, task.num_classes, side, side, generator=g) > 0.5).float()
    else:
        y = torch.randint(0, task.num_classes, (batch,), generator=g)
    return x, y


def _median_ms(step, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _plain_step(model, criterion, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        opt.step()

    return step


def _dp_step(model, criterion, x, y, mode: str):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    out = (BKPrivacyEngine if mode == "bk" else PrivacyEngine)(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, criterion=criterion,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=mode,
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


def run(batch: int, side: int | None, modes: list[str], warmup: int, repeat: int) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(ROOT / "conf/model/*.yaml"))):
        model_cfg = OmegaConf.load(path)
        task_name, task = _task_for(model_cfg)
        s = side or spatial_multiple(model_cfg)
        x, y = _batch(task, batch, s)
        criterion = _criterion(task)
        cfg = OmegaConf.create({"model": model_cfg, "task": task, "seed": 0})
        plain_ms = _median_ms(_plain_step(build_model(cfg), criterion, x, y), warmup, repeat)
        for mode in modes:
            row = {"model": model_cfg.name, "task": task_name, "mode": mode, "batch": batch,
                   "side": s, "plain_ms": round(plain_ms, 2)}
            try:
                dp_ms = _median_ms(_dp_step(build_model(cfg), criterion, x, y, mode), warmup, repeat)
                row |= {"dp_ms": round(dp_ms, 2), "ratio": round(dp_ms / plain_ms, 3), "error": None}
            except Exception as e:  # a mode that cannot handle a net is a result, not a crash
                row |= {"dp_ms": None, "ratio": None, "error": f"{type(e).__name__}: {str(e)[:160]}"}
            rows.append(row)
            print(f"{row['model']:<12} {row['task']:<6} {mode:<10} {plain_ms:9.1f} "
                  f"{row['dp_ms'] if row['dp_ms'] is not None else '-':>9} "
                  f"{row['ratio'] if row['ratio'] is not None else row['error']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: batch 2, smallest input, 1 repeat")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeat", type=int, default=7, help="timed steps per measurement (median)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_dp.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore", UserWarning)  # Opacus' per-call hook / secure-RNG notices
    modes = [m for m in a.modes.split(",") if m]
    batch, side, warmup, repeat = (2, None, 0, 1) if a.tiny else (16, 64, 2, a.repeat)
    print(f"{'model':<12} {'task':<6} {'mode':<10} {'plain_ms':>9} {'dp_ms':>9} ratio (dp/plain)")
    rows = run(batch, side, modes, warmup, repeat)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "torch": torch.__version__, "threads": a.threads, "batch": batch, "repeat": repeat,
        "results": rows,
    }, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
