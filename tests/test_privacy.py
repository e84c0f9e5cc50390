"""carefl.privacy: restored accountants, independent epsilon cross-checks, budget, DP randomness."""

import warnings

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from torch.utils.data import DataLoader, TensorDataset

from carefl import budget
from carefl.errors import ConfigError
from carefl.models import plain_state_dict
from carefl.privacy import budget_check, calibrate_noise, epsilon, make_private, projected_epsilon, sample_rate
from carefl.receipts import LOG_FILE, ReceiptLog, SigningKey

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook")

N, BATCH, SIGMA, C, DELTA = 48, 8, 1.3, 1.0, 1e-5  # q = 1/6, 6 steps per epoch
DATA = TensorDataset(torch.randn(N, 5, generator=torch.Generator().manual_seed(1)),
                     torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(2)))


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(DATA, batch_size=BATCH)


def _train_epochs(model, opt, loader, epochs):
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def _dp_accounting_eps(history, delta, kind):
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_restored_history_per_round_equals_one_continuous_history(tmp_path, accountant):
    rounds, q = 3, sample_rate(N, BATCH)
    key, log = SigningKey.load_or_create(tmp_path / "key.pem"), ReceiptLog(tmp_path / LOG_FILE)
    eps_per_round = []
    for r in range(rounds):
        model, opt, loader = _fresh()  # everything re-created each round, as in a ClientApp
        history = budget.load(tmp_path, key, log)
        predicted = projected_epsilon(history, SIGMA, q, len(loader), DELTA, accountant)
        model, opt, loader, engine = make_private(
            model, opt, loader, noise_multiplier=SIGMA, max_grad_norm=C,
            accountant=accountant, history=history)
        _train_epochs(model, opt, loader, 1)
        budget.save(tmp_path, key, engine.accountant.history)
        eps_per_round.append(epsilon(budget.load(tmp_path, key, log), DELTA, accountant))
        assert eps_per_round[-1] == pytest.approx(predicted, rel=1e-9)  # projection is exact

    model, opt, loader = _fresh()
    model, opt, loader, engine = make_private(
        model, opt, loader, noise_multiplier=SIGMA, max_grad_norm=C, accountant=accountant)
    _train_epochs(model, opt, loader, rounds)

    assert budget.load(tmp_path, key, log) == engine.accountant.history == [(SIGMA, q, rounds * int(1 / q))]
    assert eps_per_round[-1] == epsilon(engine.accountant.history, DELTA, accountant)
    assert eps_per_round[0] < eps_per_round[1] < eps_per_round[2]  # epsilon never restarts


@pytest.mark.parametrize("accountant, reference", [("rdp", "rdp"), ("prv", "pld")])
def test_epsilon_and_calibration_match_google_dp_accounting(accountant, reference):
    q, steps = sample_rate(10_000, 64), 2_000  # q = 1/157
    for sigma in (0.8, 1.1, 2.0):
        ours = epsilon([(sigma, q, steps)], DELTA, accountant)
        assert ours == pytest.approx(_dp_accounting_eps([(sigma, q, steps)], DELTA, reference), rel=0.01)
    # a two-phase history (sigma changed mid-way) composes the same way
    history = [(1.1, q, 500), (1.5, 2 * q, 300)]
    assert epsilon(history, DELTA, accountant) == pytest.approx(
        _dp_accounting_eps(history, DELTA, reference), rel=0.01)

    for target in (1.0, 8.0):
        sigma = calibrate_noise(target, DELTA, q, steps, accountant)
        assert _dp_accounting_eps([(sigma, q, steps)], DELTA, reference) == pytest.approx(target, rel=0.01)


def test_budget_check_refuses_exactly_when_projection_crosses_cap():
    sigma, q, steps = 1.0, 0.05, 40  # one round = 40 steps
    eps2 = epsilon([(sigma, q, 2 * steps)], DELTA, "rdp")
    eps3 = epsilon([(sigma, q, 3 * steps)], DELTA, "rdp")
    cap = (eps2 + eps3) / 2  # room for 2 rounds, not 3

    history, verdicts = [], []
    for _ in range(3):
        ok, projected, reason = budget_check(cap, DELTA, history, sigma, q, steps, "rdp")
        verdicts.append(ok)
        assert (reason == "") == ok
        if ok:  # the round is trained: the accountant merges it into one entry
            history = [(sigma, q, len(verdicts) * steps)]
    assert verdicts == [True, True, False]
    assert projected == pytest.approx(eps3) and "cap" in reason

    # the boundary itself: a cap equal to the projection passes, a hair below refuses
    assert budget_check(eps2, DELTA, [(sigma, q, steps)], sigma, q, steps, "rdp")[0]
    assert not budget_check(eps2 * (1 - 1e-9), DELTA, [(sigma, q, steps)], sigma, q, steps, "rdp")[0]


def test_state_dict_sent_is_the_plain_models():
    model, opt, loader = _fresh()
    plain_keys = set(model.state_dict())
    dp_model, *_ = make_private(model, opt, loader, noise_multiplier=SIGMA, max_grad_norm=C)
    assert all(k.startswith("_module.") for k in dp_model.state_dict())
    sd = plain_state_dict(dp_model)
    assert set(sd) == plain_keys
    fresh, _, _ = _fresh()
    fresh.load_state_dict(sd, strict=True)


def test_bad_privacy_settings_raise_config_errors():
    model, opt, loader = _fresh()
    with pytest.raises(ConfigError, match="privacy.accountant"):
        make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, accountant="gdpx")
    with pytest.raises(ConfigError, match="privacy.grad_sample_mode"):
        make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="privacy.target_delta"):
        calibrate_noise(8.0, 1.5, 0.1, 100)


def _one_dp_step(noise_multiplier=SIGMA, batch_size=BATCH):
    """(indices of the Poisson batch, model weights after one DP-SGD step) on the same config,
    the same initial model and an identically seeded global RNG."""
    model, opt, _ = _fresh()
    indexed = TensorDataset(torch.arange(N), DATA.tensors[0], DATA.tensors[1])
    model, opt, loader, _ = make_private(model, opt, DataLoader(indexed, batch_size=batch_size),
                                         noise_multiplier=noise_multiplier, max_grad_norm=C)
    torch.manual_seed(0)  # whatever the process' global RNG holds, DP draws do not use it
    idx, x, y = next(iter(loader))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return frozenset(idx.tolist()), torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dp_batches_and_noise_come_from_os_entropy_not_from_the_config():
    """Two runs with identical config (and an identically seeded global RNG) draw different
    Poisson batches and different noise: nobody who knows the config can predict them."""
    batches = {_one_dp_step()[0] for _ in range(4)}
    assert len(batches) > 1  # q = 1/6 over 48 records: 4 equal batches have probability ~ 0
    # q = 1 (batch = all records): the batch is fixed, so runs differ only by their noise
    _, a = _one_dp_step(batch_size=N)
    _, b = _one_dp_step(batch_size=N)
    _, quiet_a = _one_dp_step(noise_multiplier=1e-12, batch_size=N)
    _, quiet_b = _one_dp_step(noise_multiplier=1e-12, batch_size=N)
    assert torch.allclose(quiet_a, quiet_b, atol=1e-6)  # same batch, no noise: same step
    assert (a - b).abs().max() > 1e-3  # same batch, sigma=1.3: the noise differs between runs


def test_secure_mode_without_torchcsprng_is_one_clear_config_error():
    """privacy.secure_mode needs Opacus' CSPRNG backend (torchcsprng); where it is missing the
    hospital gets a ConfigError naming the key and the fix, not an ImportError mid-round."""
    import importlib.util

    from carefl.privacy import make_private

    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here: secure mode works")
    model = torch.nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(ConfigError, match="privacy.secure_mode"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                     noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True)
