"""carefl.models: every conf/model/*.yaml trains under real Opacus DP-SGD on each task it supports."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from carefl.errors import ConfigError
from carefl.models import build_model, plain_state_dict, spatial_multiple
from carefl.privacy import make_private

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook")

CONF = Path(__file__).resolve().parent.parent / "conf"
MODEL_FILES = sorted((CONF / "model").glob("*.yaml"))  # a new model file is covered automatically
TASK_FILES = sorted((CONF / "task").glob("*.yaml"))


def _cfg(model_file: Path, task_file: Path, seed: int = 0):
    return OmegaConf.create({"model": OmegaConf.load(model_file), "task": OmegaConf.load(task_file), "seed": seed})


def _supported(model_file: Path) -> list[Path]:
    tasks = []
    for task_file in TASK_FILES:
        try:
            build_model(_cfg(model_file, task_file))
            tasks.append(task_file)
        except ConfigError:
            pass
    return tasks


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=lambda p: p.stem)
def test_each_model_supports_2d_and_3d_and_rejects_the_other_kind(model_file):
    supported = _supported(model_file)
    assert sorted(OmegaConf.load(t).spatial_dims for t in supported) == [2, 3]
    for task_file in set(TASK_FILES) - set(supported):
        with pytest.raises(ConfigError, match="model=") as err:
            build_model(_cfg(model_file, task_file))
        assert "choose model= one of" in str(err.value)


@pytest.mark.parametrize(
    "model_file, task_file",
    [(m, t) for m in MODEL_FILES for t in TASK_FILES],
    ids=lambda p: p.stem,
)
def test_one_real_dp_sgd_step(model_file, task_file):
    cfg = _cfg(model_file, task_file)
    try:
        model = build_model(cfg)
    except ConfigError:
        assert task_file not in _supported(model_file)
        return
    task = cfg.task
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    n, side = 2, spatial_multiple(cfg.model)
    spatial = (side,) * task.spatial_dims
    x = torch.randn(n, task.in_channels, *spatial)
    if task.kind == "segmentation":
        y = (torch.rand(n, task.num_classes, *spatial) > 0.5).float()
        loss_fn = torch.nn.BCEWithLogitsLoss()
    else:
        y = torch.randint(0, task.num_classes, (n,))
        loss_fn = torch.nn.CrossEntropyLoss()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # batch_size == n: Poisson rate q = 1, so the one batch holds every record
    dp_model, dp_opt, loader, _ = make_private(
        model, opt, DataLoader(TensorDataset(x, y), batch_size=n), noise_multiplier=1.0, max_grad_norm=1.0)

    (xb, yb), = list(loader)
    out = dp_model(xb)
    expected = (n, task.num_classes, *spatial) if task.kind == "segmentation" else (n, task.num_classes)
    assert tuple(out.shape) == expected
    loss_fn(out, yb).backward()
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == n
               for p in dp_model.parameters() if p.requires_grad)
    dp_opt.step()

    after = plain_state_dict(dp_model)
    params = {k for k, _ in model.named_parameters()}
    assert set(after) == set(before)
    assert all(not torch.equal(before[k], after[k]) for k in params)  # every weight moved


def test_init_is_deterministic_from_seed_and_leaves_global_rng_alone():
    unet, seg2d = CONF / "model/unet.yaml", CONF / "task/seg2d.yaml"
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(_cfg(unet, seg2d, seed=7)).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(_cfg(unet, seg2d, seed=7)).state_dict()
    c = build_model(_cfg(unet, seg2d, seed=8)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_model_name_lists_choices():
    cfg = _cfg(CONF / "model/unet.yaml", CONF / "task/seg2d.yaml")
    cfg.model.name = "resnet9000"
    with pytest.raises(ConfigError, match=r"model=resnet9000 .*basicunet.*unet"):
        build_model(cfg)


def test_bench_dp_tiny_smoke(tmp_path):
    root = CONF.parent
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(root / "benchmarks/bench_dp.py"), "--tiny", "--modes", "hooks",
                    "--out", str(out)], check=True, cwd=root, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())["results"]
    assert sorted(r["model"] for r in rows) == sorted(OmegaConf.load(f).name for f in MODEL_FILES)
    assert all(r["error"] is None and r["dp_ms"] > 0 and r["plain_ms"] > 0 for r in rows)
