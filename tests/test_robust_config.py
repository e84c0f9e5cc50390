"""Strategy configs build, and impossible ones fail loudly with the key and the fix."""

import glob

import pytest
import torch

from carefl.errors import ConfigError
from carefl.robust import build_aggregator, build_server_optimizer, check_assumptions

torch.set_num_threads(1)
STRATEGIES = sorted(glob.glob("conf/strategy/*.yaml"))
EXPECTED = {"fedavg", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed",
            "centered_clip", "cosine_filter", "fedavgm", "fedadam", "fedprox", "robust"}


def cfg(rule, f=1, pre=(), server_opt=None, prox_mu=0.0):
    return {"name": "t", "f": f, "rule": rule, "pre": list(pre),
            "server_opt": server_opt or {"name": "sgd", "lr": 1.0}, "prox_mu": prox_mu}


def test_every_expected_strategy_file_exists():
    assert {p.split("/")[-1][:-5] for p in STRATEGIES} >= EXPECTED


@pytest.mark.parametrize("path", STRATEGIES)
def test_strategy_file_builds_and_comments_every_key(path):
    from carefl.config import compose_config  # composes Hydra defaults (robust extends trimmed_mean)

    name = path.split("/")[-1][:-5]
    conf = compose_config([f"strategy={name}", "federation.hospitals=[a,b,c,d,e,f,g,h,i,j,k]"]).strategy
    assert set(conf) == {"name", "f", "rule", "pre", "server_opt", "prox_mu", "secagg"}  # secagg: conf/secagg/
    check_assumptions(conf, 9)
    agg, opt = build_aggregator(conf), build_server_optimizer(conf)
    x = torch.randn(9, 30)
    step = opt.step(agg(x, [5] * 9).update)
    assert step.shape == (30,) and torch.isfinite(step).all()
    lines = [ln for ln in open(path).read().splitlines() if ln and not ln.lstrip().startswith("#")]
    top = [ln for ln in lines if not ln.startswith(" ")]
    uncommented = [ln for ln in top if "#" not in ln]
    # a key without a trailing comment must have its comment on the line(s) just above
    text = open(path).read().splitlines()
    for ln in uncommented:
        assert text[text.index(ln) - 1].lstrip().startswith("#"), f"{path}: uncommented key line {ln!r}"


@pytest.mark.parametrize(
    "strategy,n,needle",
    [
        (cfg({"name": "krum"}, f=1), 4, "strategy.rule.name=krum needs n > 2*strategy.f+2 = 4"),
        (cfg({"name": "multikrum", "m": None}, f=2), 6, "lower strategy.f to 1"),
        (cfg({"name": "multikrum", "m": 9}, f=1), 8, "strategy.rule.m=9"),
        (cfg({"name": "bulyan"}, f=1), 6, "strategy.rule.name=bulyan needs n >= 4*strategy.f+3 = 7"),
        (cfg({"name": "trimmed_mean", "beta": 0.1}, f=2), 10, "strategy.rule.beta=0.1 trims 1 per side"),
        (cfg({"name": "trimmed_mean", "beta": None}, f=2), 4, "nothing left"),
        (cfg({"name": "median"}, f=2), 4, "strategy.rule.name=median tolerates strategy.f < n/2"),
        (cfg({"name": "geomed"}, f=3), 6, "lower strategy.f to 2"),
        (cfg({"name": "centered_clip", "tau": 0}, f=1), 5, "strategy.rule.tau=0"),
        (cfg({"name": "krum"}, f=1, pre=[{"name": "bucketing", "s": 2}]), 8, "rows after bucketing"),
        (cfg({"name": "median"}, f=2, pre=[{"name": "nnm"}]), 4, "strategy.pre[0] (nnm)"),
        (cfg({"name": "trimmed_mean"}, f=2, pre=[{"name": "arc"}, {"name": "nnm"}]), 4, "strategy.pre[0] (arc) needs strategy.f < n/2"),
        (cfg({"name": "krumm"}), 9, "strategy.rule.name='krumm' is unknown; choose one of ['bulyan'"),
        (cfg({"name": "median"}, pre=[{"name": "clipp"}]), 9, "strategy.pre[0].name='clipp' is unknown; choose one of ['arc', 'bucketing', 'clip', 'nnm']"),
        (cfg({"name": "median"}, server_opt={"name": "adam"}), 9, "strategy.server_opt.name='adam' is unknown; choose one of ['fedadam', 'fedavgm', 'sgd']"),
        (cfg({"name": "krum", "m": 3}), 9, "strategy.rule.m is not a setting of 'krum'"),
        (cfg({"name": "median"}, server_opt={"name": "fedavgm", "momentum": 1.5}), 9, "strategy.server_opt.momentum=1.5"),
        (cfg({"name": "median"}, f=-1), 9, "strategy.f=-1"),
        (cfg({"name": "median"}, prox_mu=-0.1), 9, "strategy.prox_mu=-0.1"),
    ],
)
def test_check_assumptions_names_the_key_and_the_fix(strategy, n, needle):
    with pytest.raises(ConfigError) as err:
        check_assumptions(strategy, n)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_boundaries_pass():
    check_assumptions(cfg({"name": "krum"}, f=1), 5)
    check_assumptions(cfg({"name": "bulyan"}, f=1), 7)
    check_assumptions(cfg({"name": "trimmed_mean", "beta": 0.2}, f=2), 10)
    check_assumptions(cfg({"name": "median"}, f=2), 5)
    check_assumptions(cfg({"name": "trimmed_mean"}, f=2, pre=[{"name": "arc"}, {"name": "nnm"}]), 10)


def test_aggregator_raises_instead_of_skipping_a_round():
    agg = build_aggregator(cfg({"name": "bulyan"}, f=1))
    agg(torch.randn(7, 5), [1] * 7)
    with pytest.raises(ConfigError, match="4\\*strategy.f\\+3"):
        agg(torch.randn(6, 5), [1] * 6)  # a hospital dropped out
