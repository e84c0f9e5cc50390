"""DP-SGD at its edges (issue 13, points 3 and 4): FedProx under DP, empty Poisson batches, and
the plan (q, steps) against what the Opacus loader really runs and accounts for every k <= 1000."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset, TensorDataset

from carefl import privacy
from carefl.config import compose_config
from carefl.hospital import local_steps
from carefl.models import build_model
from carefl.privacy import calibrate_noise, epsilon, extended, make_private, sample_rate
from carefl.training import make_optimizer, train_epochs

torch.set_num_threads(1)
pytestmark = [pytest.mark.filterwarnings(f"ignore:{m}") for m in (
    "Secure RNG turned off", "Full backward hook", "Optimal order is the largest alpha")]
CLS = OmegaConf.create({"kind": "classification", "loss": "ce", "num_classes": 2})
C = 1.0
RAND_GRID = 2**24  # torch.rand's float32 draws are multiples of 2**-24


def _seeded(monkeypatch, seed):
    """DP sampling and noise from a seeded generator (make_private draws them from OS entropy)."""
    monkeypatch.setattr(privacy, "entropy_generator", lambda: torch.Generator().manual_seed(seed))


def _tiny(n=8, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(seed + 1)
    data = TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 2, (n,), generator=g))
    return model, data


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


# ---- point 3: FedProx under DP-SGD ----------------------------------------------------


def _dp_train(monkeypatch, *, epochs, mu, batch_size, sigma=1.0, lr=0.05, n=8, noise_seed=7, model_seed=0):
    """(weights before, weights after) of ``epochs`` DP-SGD epochs, SGD with momentum 0.9."""
    _seeded(monkeypatch, noise_seed)
    model, data = _tiny(n, model_seed)
    start = _flat(model)
    opt = make_optimizer(model, "sgd", lr)
    dp_model, dp_opt, loader, _ = make_private(model, opt, DataLoader(data, batch_size=batch_size),
                                               noise_multiplier=sigma, max_grad_norm=C)
    train_epochs(dp_model, dp_opt, loader, CLS, epochs, prox_mu=mu)
    return start, _flat(model)


@pytest.mark.parametrize("mu", [0.1, 3.0, 1e4])
@pytest.mark.parametrize("model_seed, noise_seed", [(0, 7), (1, 11), (2, 123)])
def test_fedprox_changes_the_dp_update_by_exactly_its_proximal_gradient(monkeypatch, mu, model_seed, noise_seed):
    """Batch = whole training set (q = 1) and seeded sampling/noise, so runs differ only by mu.
    Step 1 starts at w_global (proximal gradient 0); step 2 then differs by exactly
    -lr * mu * (w1 - w_global), momentum or not (the momentum buffer holds step 1 only)."""
    lr, kw = 0.05, dict(batch_size=8, lr=0.05, noise_seed=noise_seed, model_seed=model_seed)
    w0, w1 = _dp_train(monkeypatch, epochs=1, mu=mu, **kw)
    _, w1_without = _dp_train(monkeypatch, epochs=1, mu=0.0, **kw)
    assert torch.equal(w1, w1_without)  # the proximal gradient vanishes at w_global
    _, w2_without = _dp_train(monkeypatch, epochs=2, mu=0.0, **kw)
    _, w2_with = _dp_train(monkeypatch, epochs=2, mu=mu, **kw)
    expected = -lr * mu * (w1 - w0)
    assert expected.abs().max() > 1e-5  # mu makes a difference worth measuring
    # float32 weights: a few roundings of values up to |w2| each
    atol = 1e-6 * (1 + max(w2_with.abs().max(), w2_without.abs().max()))
    assert torch.allclose(w2_with - w2_without, expected, rtol=1e-3, atol=float(atol))


def test_fedprox_under_dp_keeps_weights_near_the_global_model(monkeypatch):
    """q = 1/4, 10 epochs, identical batches and noise: mu = 2 pulls the weights to w_global."""
    drift = {}
    for mu in (0.0, 2.0):
        start, end = _dp_train(monkeypatch, epochs=10, mu=mu, batch_size=2, sigma=0.5, lr=0.05)
        drift[mu] = float((end - start).norm())
    assert drift[2.0] < 0.7 * drift[0.0]


# ---- point 4a: empty Poisson batches --------------------------------------------------


def _seg_setup():
    cfg = compose_config("data.image_size=16 model.channels=[4,8,16] privacy=dp")
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16)
    return cfg, TensorDataset(x, (x > 0.6).float())


def _batches(cfg, data, seed, monkeypatch, epochs):
    """Poisson batches (record indices) that make_private's loader draws with this seed."""
    _seeded(monkeypatch, seed)
    model = build_model(cfg)
    _, _, loader, _ = make_private(model, make_optimizer(model, "sgd", 0.01), DataLoader(data, batch_size=1),
                                   noise_multiplier=1.0, max_grad_norm=C)
    return [batch for _ in range(epochs) for batch in loader.batch_sampler]


def _seg_round(cfg, data, seed, monkeypatch, sigma, epochs):
    _seeded(monkeypatch, seed)
    model = build_model(cfg)
    start = _flat(model)
    dp_model, dp_opt, loader, engine = make_private(model, make_optimizer(model, "sgd", 0.01),
                                                    DataLoader(data, batch_size=1), noise_multiplier=sigma,
                                                    max_grad_norm=C)
    result = train_epochs(dp_model, dp_opt, loader, cfg.task, epochs)
    return result, engine.accountant.history, start, _flat(model)


@pytest.mark.parametrize("which", ["first epoch all empty", "first batch empty, later ones mixed"])
def test_an_empty_poisson_batch_is_an_accounted_noise_only_step(monkeypatch, which):
    """The UNet (GroupNorm) that crashed on an empty batch ("expected groups to be greater than 0")
    trains through empty batches; each is one step, accounted like any other, that moves the
    weights only by noise."""
    cfg, data = _seg_setup()  # N = 3, B = 1: q = 1/3, 3 steps per epoch, P(empty batch) = 8/27
    epochs = 1 if which.startswith("first epoch") else 4
    for seed in range(2000):
        batches = _batches(cfg, data, seed, monkeypatch, epochs)
        if which.startswith("first epoch") and all(len(b) == 0 for b in batches):
            break
        if not which.startswith("first epoch") and len(batches[0]) == 0 and sum(len(b) > 0 for b in batches) >= 3:
            break
    else:
        pytest.fail("no seed gives the batches this test needs")

    q, steps = sample_rate(3, 1), local_steps(3, 1, epochs)
    result, history, start, end = _seg_round(cfg, data, seed, monkeypatch, sigma=1.0, epochs=epochs)
    assert result.steps == steps == epochs * 3
    assert history == extended([], 1.0, q, steps) == [(1.0, q, steps)]  # every step accounted
    assert torch.isfinite(end).all() and (end - start).abs().max() > 1e-4  # noise moved the weights
    assert math.isfinite(result.loss)
    if which.startswith("first epoch"):  # no record was ever seen: with (almost) no noise, no move
        _, _, start, end = _seg_round(cfg, data, seed, monkeypatch, sigma=1e-12, epochs=epochs)
        assert (end - start).abs().max() < 1e-9


# ---- point 4b: the planned (q, steps) is what the loader runs and the accountant records ----


@pytest.mark.parametrize("batch_size", [32, 16, 8, 4])
def test_planned_q_and_steps_are_what_the_dp_loader_runs_for_every_k_up_to_1000(batch_size):
    """For each k = ceil(N / B) <= 1000 (N at a different remainder mod B each time): the loader
    runs k steps per epoch, samples each record with probability <= q on torch.rand's grid, and
    the accountant records (sigma, q) per step, q = sample_rate(N, B) -- what the hospital plans
    and calibrates with (Opacus' own loader ran k - 1 steps at 1 / (k - 1) for k = 93, 99, ...)."""
    records = TensorDataset(torch.zeros(1000 * batch_size, 1), torch.zeros(1000 * batch_size, dtype=torch.long))
    wrong = []
    for k in range(1, 1001):
        n = max(1, k * batch_size - (k % batch_size))
        q, planned = sample_rate(n, batch_size), local_steps(n, batch_size, 1)
        model = torch.nn.Linear(1, 2)
        _, opt, loader, engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                              DataLoader(Subset(records, range(n)), batch_size=batch_size),
                                              noise_multiplier=1.0, max_grad_norm=C)
        for p in opt.params:  # one noise-only step: the accountant records its (sigma, q)
            p.grad_sample = p.new_zeros((0, *p.shape))
        opt.step()
        threshold = loader.batch_sampler.sample_rate
        runs = (len(loader), loader.batch_sampler.steps, engine.accountant.history)
        if (planned, q) != (k, 1 / k) or runs != (k, k, [(1.0, q, 1)]) or not (
                q - 1 / RAND_GRID < threshold <= q and (threshold * RAND_GRID).is_integer()):
            wrong.append((k, n, q, threshold, runs))
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("n, batch_size", [(1488, 16), (93, 1), (2976, 32)])
def test_a_hospital_at_k_93_spends_exactly_its_plan_and_stays_under_its_cap(monkeypatch, n, batch_size):
    """The reported failure: N = 1488, B = 16 (k = 93) reached epsilon 8.018 > cap 8 on the last
    round. Three real rounds of DP-SGD, history restored each round, end exactly on the plan."""
    rounds, cap, delta = 3, 8.0, 1e-5
    q, per_round = sample_rate(n, batch_size), local_steps(n, batch_size, 1)
    sigma = calibrate_noise(cap, delta, q, rounds * per_round, "rdp")
    _seeded(monkeypatch, 5)
    history = []
    for _ in range(rounds):
        model, data = _tiny(n)
        dp_model, opt, loader, engine = make_private(model, make_optimizer(model, "sgd", 0.01),
                                                     DataLoader(data, batch_size=batch_size), noise_multiplier=sigma,
                                                     max_grad_norm=C, accountant="rdp", history=history)
        assert train_epochs(dp_model, opt, loader, CLS, 1).steps == per_round == 93
        history = list(engine.accountant.history)
    assert history == [(sigma, q, rounds * per_round)]
    assert epsilon(history, delta, "rdp") <= cap


# ---- a hospital's data-workers: batches built in worker processes --------------------


@pytest.mark.parametrize("epochs", [1, 3])
def test_data_workers_change_where_batches_are_built_not_the_dp_steps(monkeypatch, epochs):
    """make_private keeps make_loader's workers on its Poisson loader. The main process still
    draws the Poisson batches (the batch sampler), so with the same seeds a DP-SGD epoch with one
    worker takes the very steps of one without (same weights after); later epochs keep the
    planned step count, empty Poisson batches included."""
    from carefl.training import make_loader

    def run(workers: int):
        _seeded(monkeypatch, 11)
        model, data = _tiny(n=12, seed=3)
        dp_model, dp_opt, loader, engine = make_private(model, make_optimizer(model, "sgd", 0.05),
                                                        make_loader(data, 4, seed=0, workers=workers),
                                                        noise_multiplier=1.0, max_grad_norm=C)
        assert loader.num_workers == workers
        result = train_epochs(dp_model, dp_opt, loader, CLS, epochs)
        return result.steps, engine.accountant.history, _flat(model)

    steps0, history0, weights0 = run(0)
    steps1, history1, weights1 = run(1)
    assert steps0 == steps1 == epochs * local_steps(12, 4, 1) and history0 == history1
    if epochs == 1:
        assert torch.equal(weights0, weights1)
