"""Simulated Byzantine hospitals: each attack checked against its formula on hand-made rows."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from carefl.attacks import alie_z, apply_update_attack, byzantine_indices, flip_labels, flips_labels
from carefl.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"

# 4 hospitals, d = 3; rows 2 and 3 attack.
U = torch.tensor(
    [
        [1.0, 2.0, -1.0],
        [3.0, 0.0, 1.0],
        [0.5, -0.5, 2.0],
        [-2.0, 4.0, 0.0],
    ]
)
BYZ = [2, 3]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def attack(name: str, **params) -> dict:
    return {"name": name, "byzantine": BYZ, **params}


def assert_honest_unchanged(out: torch.Tensor) -> None:
    assert torch.equal(out[:2], U[:2])


def test_signflip_scales_and_flips_own_update():
    out = apply_update_attack(attack("signflip", scale=2.0), U, BYZ, gen())
    assert torch.equal(out[2:], torch.tensor([[-1.0, 1.0, -4.0], [4.0, -8.0, -0.0]]))
    assert_honest_unchanged(out)


def test_input_matrix_is_not_modified():
    before = U.clone()
    apply_update_attack(attack("signflip", scale=1.0), U, BYZ, gen())
    assert torch.equal(U, before)


def test_gaussian_replaces_rows_with_seeded_noise():
    out = apply_update_attack(attack("gaussian", sigma=3.0), U, BYZ, gen(7))
    expected = 3.0 * torch.randn((2, 3), generator=gen(7))
    assert torch.allclose(out[2:], expected)
    assert_honest_unchanged(out)
    again = apply_update_attack(attack("gaussian", sigma=3.0), U, BYZ, gen(7))
    other = apply_update_attack(attack("gaussian", sigma=3.0), U, BYZ, gen(8))
    assert torch.equal(out, again)
    assert not torch.equal(out[2:], other[2:])


def test_scaling_uses_factor_or_n_by_default():
    out = apply_update_attack(attack("scaling", factor=0.5), U, BYZ, gen())
    assert torch.equal(out[2:], 0.5 * U[2:])
    boosted = apply_update_attack(attack("scaling", factor=None), U, BYZ, gen())
    assert torch.equal(boosted[2:], 4.0 * U[2:])  # n = 4 hospitals
    assert_honest_unchanged(boosted)


def test_alie_rows_equal_mu_minus_z_sigma_by_hand():
    # honest rows [1, 2, -1] and [3, 0, 1]: mu = [2, 1, 0], population sigma = [1, 1, 1]
    out = apply_update_attack(attack("alie", z=1.5), U, BYZ, gen())
    assert torch.allclose(out[2:], torch.tensor([[0.5, -0.5, -1.5]] * 2))
    assert_honest_unchanged(out)


def test_alie_default_z_follows_the_paper():
    # n=10, f=2: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1((10 - 4) / 10) = Phi^-1(0.6)
    assert alie_z(10, 2) == pytest.approx(0.253347, abs=1e-6)
    # n=4, f=2: s = 1, z = Phi^-1(0.75)
    out = apply_update_attack(attack("alie", z=None), U, BYZ, gen())
    z = 0.6744898
    assert torch.allclose(out[2:], torch.tensor([[2 - z, 1 - z, -z]] * 2))


def test_alie_z_undefined_when_too_many_attackers():
    with pytest.raises(ConfigError, match="attack.z"):
        alie_z(4, 3)


def test_ipm_sends_negative_scaled_honest_mean():
    out = apply_update_attack(attack("ipm", epsilon=0.5), U, BYZ, gen())
    assert torch.allclose(out[2:], torch.tensor([[-1.0, -0.5, 0.0]] * 2))
    assert_honest_unchanged(out)


def test_omniscient_attack_without_honest_rows_is_a_config_error():
    with pytest.raises(ConfigError, match="attack.byzantine"):
        apply_update_attack({"name": "ipm", "epsilon": 0.1, "byzantine": [0, 1, 2, 3]}, U, [0, 1, 2, 3], gen())


@pytest.mark.parametrize("cfg", [{"name": "none", "byzantine": []}, attack("labelflip")])
def test_none_and_labelflip_leave_updates_unchanged(cfg):
    assert torch.equal(apply_update_attack(cfg, U, BYZ, gen()), U)


def test_no_byzantine_rows_leaves_updates_unchanged():
    assert torch.equal(apply_update_attack(attack("signflip", scale=1.0), U, [], gen()), U)


def test_fraction_picks_last_hospitals_rounded_half_up():
    cfg = {"name": "signflip", "scale": 1.0, "byzantine": None, "fraction": 0.2}
    assert byzantine_indices(cfg, 10) == [8, 9]
    assert byzantine_indices(cfg, 3) == [2]  # 0.6 -> 1
    assert byzantine_indices(cfg, 2) == []  # 0.4 -> 0
    assert byzantine_indices({**cfg, "fraction": 0.5}, 5) == [2, 3, 4]  # 2.5 -> 3


def test_explicit_list_wins_and_is_sorted():
    cfg = {"name": "signflip", "scale": 1.0, "byzantine": [3, 0], "fraction": 0.2}
    assert byzantine_indices(cfg, 5) == [0, 3]


@pytest.mark.parametrize("bad", [[5], [-1], [1, 1], [0.5], "0", [True]])
def test_bad_indices_name_attack_byzantine(bad):
    with pytest.raises(ConfigError, match="attack.byzantine"):
        byzantine_indices({"name": "none", "byzantine": bad}, 5)


def test_bad_indices_rejected_at_apply_time_too():
    with pytest.raises(ConfigError, match="attack.byzantine"):
        apply_update_attack(attack("signflip", scale=1.0), U, [4], gen())


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"name": "bogus", "byzantine": []}, "attack.name"),
        ({"name": "signflip", "byzantine": []}, "attack.scale"),
        ({"name": "gaussian", "sigma": -1.0, "byzantine": []}, "attack.sigma"),
        ({"name": "ipm", "epsilon": "big", "byzantine": []}, "attack.epsilon"),
        ({"name": "labelflip", "byzantine": None, "fraction": 1.0}, "attack.fraction"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        byzantine_indices(cfg, 5)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_validate_and_default_to_last_hospital(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem
    expected = [] if path.stem == "none" else [4]  # fraction 0.2 of 5 hospitals
    assert byzantine_indices(cfg, 5) == expected
    apply_update_attack(cfg, torch.randn(5, 3, generator=gen()), expected, gen())


def test_flips_labels_only_for_labelflip_attackers():
    cfg = {"name": "labelflip", "byzantine": [1]}
    assert [flips_labels(cfg, i, 3) for i in range(3)] == [False, True, False]
    assert not flips_labels({"name": "signflip", "scale": 1.0, "byzantine": [1]}, 1, 3)


def test_flip_labels_segmentation_inverts_mask():
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # (1, H, W)
    assert torch.equal(flip_labels(mask, "segmentation", 1), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    classes = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])  # 3-class map: shifted, still valid class indices
    assert torch.equal(flip_labels(classes, "segmentation", 3), torch.tensor([[[1.0, 2.0], [0.0, 1.0]]]))


def test_flip_labels_classification_shifts_classes():
    labels = torch.tensor([0, 1, 2], dtype=torch.int64)
    assert torch.equal(flip_labels(labels, "classification", 3), torch.tensor([1, 2, 0]))
    assert torch.equal(flip_labels(torch.tensor(1), "classification", 2), torch.tensor(0))
    assert flip_labels(torch.tensor(0), "classification", 2).dtype == torch.int64


def test_flip_labels_rejects_unknown_task_kind():
    with pytest.raises(ConfigError, match="task.kind"):
        flip_labels(torch.tensor(0), "detection", 2)
