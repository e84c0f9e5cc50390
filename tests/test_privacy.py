"""carefl.privacy: accountant persistence, independent epsilon cross-checks, budget, site policy."""

import json
import warnings

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from torch.utils.data import DataLoader, TensorDataset

from carefl.errors import ConfigError
from carefl.models import plain_state_dict
from carefl.privacy import (
    HISTORY_FILE,
    SitePolicy,
    budget_check,
    calibrate_noise,
    epsilon,
    load_history,
    make_private,
    projected_epsilon,
    sample_rate,
    save_history,
    site_policy,
)

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
    eps_per_round = []
    for r in range(rounds):
        model, opt, loader = _fresh()  # everything re-created each round, as in a ClientApp
        history = load_history(tmp_path, expect_existing=r > 0)
        predicted = projected_epsilon(history, SIGMA, q, len(loader), DELTA, accountant)
        model, opt, loader, engine = make_private(
            model, opt, loader, noise_multiplier=SIGMA, max_grad_norm=C,
            accountant=accountant, history=history)
        _train_epochs(model, opt, loader, 1)
        save_history(tmp_path, engine.accountant.history)
        eps_per_round.append(epsilon(load_history(tmp_path), DELTA, accountant))
        assert eps_per_round[-1] == pytest.approx(predicted, rel=1e-9)  # projection is exact

    model, opt, loader = _fresh()
    model, opt, loader, engine = make_private(
        model, opt, loader, noise_multiplier=SIGMA, max_grad_norm=C, accountant=accountant)
    _train_epochs(model, opt, loader, rounds)

    assert load_history(tmp_path) == engine.accountant.history == [(SIGMA, q, rounds * int(1 / q))]
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
    policy = SitePolicy(epsilon_cap=(eps2 + eps3) / 2, delta=DELTA)  # room for 2 rounds, not 3

    history, verdicts = [], []
    for _ in range(3):
        ok, projected, reason = budget_check(policy, history, sigma, q, steps, "rdp")
        verdicts.append(ok)
        assert (reason == "") == ok
        if ok:  # the round is trained: the accountant merges it into one entry
            history = [(sigma, q, len(verdicts) * steps)]
    assert verdicts == [True, True, False]
    assert projected == pytest.approx(eps3) and "cap" in reason

    # the boundary itself: a cap equal to the projection passes, a hair below refuses
    assert budget_check(SitePolicy(eps2, DELTA), [(sigma, q, steps)], sigma, q, steps, "rdp")[0]
    assert not budget_check(SitePolicy(eps2 * (1 - 1e-9), DELTA), [(sigma, q, steps)], sigma, q, steps, "rdp")[0]


def test_site_policy_hospital_values_win_and_server_cannot_raise_cap(tmp_path):
    ask = dict(requested_epsilon=8.0, requested_delta=1e-5)
    assert site_policy({}, **ask) == SitePolicy(8.0, 1e-5)  # silent hospital: the plan is the cap
    assert site_policy({"epsilon-cap": 3.0}, **ask) == SitePolicy(3.0, 1e-5)
    assert site_policy({"epsilon-cap": "3"}, requested_epsilon=1e6, requested_delta=1e-3).epsilon_cap == 3.0

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("epsilon-cap: 2.0\ndelta: 1.0e-6\n")
    assert site_policy({"site-policy": str(policy_file)}, **ask) == SitePolicy(2.0, 1e-6)
    assert site_policy({"site-policy": str(policy_file), "delta": "1e-7"}, **ask) == SitePolicy(2.0, 1e-7)
    json_file = tmp_path / "policy.json"
    json_file.write_text(json.dumps({"epsilon-cap": 4}))
    assert site_policy({"site-policy": str(json_file)}, requested_epsilon=50.0, requested_delta=1e-5) \
        == SitePolicy(4.0, 1e-5)


@pytest.mark.parametrize("node_config, file_text, names", [
    ({"epsilon-cap": -1.0}, None, ["epsilon-cap", "node config"]),
    ({"epsilon-cap": "lots"}, None, ["epsilon-cap", "not a number"]),
    ({"delta": 1.0}, None, ["delta", "node config"]),
    ({"delta": 0}, None, ["delta"]),
    ({}, "delta: 1.5\n", ["delta", "policy.yaml"]),
    ({}, "epsilon-cap: 0\n", ["epsilon-cap", "policy.yaml"]),
    ({}, "epsilon_cap: 2\n", ["policy.yaml", "epsilon-cap"]),  # typo'd key is not ignored
    ({}, "epsilon-cap: [unclosed\n", ["policy.yaml"]),
])
def test_site_policy_rejects_bad_values_naming_key_and_source(tmp_path, node_config, file_text, names):
    if file_text is not None:
        (tmp_path / "policy.yaml").write_text(file_text)
        node_config = {**node_config, "site-policy": str(tmp_path / "policy.yaml")}
    with pytest.raises(ConfigError) as err:
        site_policy(node_config, requested_epsilon=8.0, requested_delta=1e-5)
    assert all(name in str(err.value) for name in names)


def test_missing_policy_file_and_bad_server_request_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        site_policy({"site-policy": str(tmp_path / "nope.yaml")}, requested_epsilon=8.0, requested_delta=1e-5)
    with pytest.raises(ConfigError, match="target_delta"):
        site_policy({"epsilon-cap": 1.0}, requested_epsilon=8.0, requested_delta=2.0)


def test_history_file_errors_name_the_file(tmp_path):
    path = tmp_path / HISTORY_FILE
    assert load_history(tmp_path) == []
    with pytest.raises(ConfigError, match=HISTORY_FILE):
        load_history(tmp_path, expect_existing=True)
    path.write_text('{"history": [[1.1, 0.1, 3]')  # torn write
    with pytest.raises(ConfigError, match="corrupt"):
        load_history(tmp_path)
    path.write_text('{"history": [[1.1, 2.0, 3]]}')  # q > 1
    with pytest.raises(ConfigError, match=HISTORY_FILE):
        load_history(tmp_path)
    save_history(tmp_path, [(1.1, 0.1, 3), (0.9, 0.1, 2)])
    assert load_history(tmp_path, expect_existing=True) == [(1.1, 0.1, 3), (0.9, 0.1, 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [HISTORY_FILE]  # no tmp file left


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
