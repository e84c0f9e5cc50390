"""carefl.data.partition: the Dirichlet label skew, its files and the carefl-partition CLI."""

import numpy as np
import pytest

from carefl.data.medmnist import load_medmnist
from carefl.data.partition import dirichlet_split, main
from carefl.errors import ConfigError

CLS = {"kind": "classification", "spatial_dims": 2, "in_channels": 1, "num_classes": 5}


def _labels(n, classes, seed):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 100.0])
def test_every_example_goes_to_exactly_one_hospital_and_each_gets_its_minimum(alpha):
    train, test = _labels(3000, 10, 1), _labels(800, 10, 2)
    tr, te = dirichlet_split(train, test, 10, alpha, seed=3, min_train=10, min_test=2)
    for parts, pool in ((tr, train), (te, test)):
        assert len(parts) == 10
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(len(pool)))  # a partition: no loss, no copy
    assert min(map(len, tr)) >= 10 and min(map(len, te)) >= 2
    again = dirichlet_split(train, test, 10, alpha, seed=3, min_train=10, min_test=2)
    assert all(np.array_equal(a, b) for a, b in zip(tr + te, again[0] + again[1]))  # seeded


def test_small_alpha_skews_the_case_mix_and_large_alpha_does_not():
    train, test = _labels(5000, 10, 1), _labels(1000, 10, 2)

    def top_share(alpha):  # mean over hospitals of the largest class's share of its data
        tr, _ = dirichlet_split(train, test, 10, alpha, seed=0)
        return np.mean([np.bincount(train[p], minlength=10).max() / len(p) for p in tr])

    assert top_share(0.1) > 0.4  # a few classes per hospital (an even mix would give ~0.1)
    assert top_share(100.0) < 0.2  # close to the 0.1 of an even mix


def test_the_test_split_follows_the_hospitals_own_case_mix():
    train, test = _labels(6000, 4, 1), _labels(6000, 4, 2)
    tr, te = dirichlet_split(train, test, 5, 0.3, seed=5)
    for p, q in zip(tr, te):
        share_train = np.bincount(train[p], minlength=4) / len(p)
        share_test = np.bincount(test[q], minlength=4) / len(q)
        assert np.abs(share_train - share_test).max() < 0.05


def test_impossible_requests_fail_with_one_clear_error():
    train, test = _labels(50, 3, 1), _labels(20, 3, 2)
    with pytest.raises(ConfigError, match="cannot give 10 hospitals 10 / 1 each"):
        dirichlet_split(train, test, 10, 0.5, seed=0)
    with pytest.raises(ConfigError, match="alpha=0.0 must be a positive number"):
        dirichlet_split(train, test, 2, 0.0, seed=0)
    one_class = np.zeros(100, dtype=np.int64)  # a single class: each hospital gets its share of it
    with pytest.raises(ConfigError, match="no Dirichlet"):
        dirichlet_split(one_class, one_class, 5, 0.01, seed=0, min_train=19, min_test=19)


def test_cli_writes_hospital_files_the_medmnist_loader_reads(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pooled = tmp_path / "pooled.npz"
    np.savez(pooled, train_images=rng.integers(0, 255, (400, 8, 8), dtype=np.uint8),
             train_labels=_labels(400, 5, 1)[:, None], test_images=rng.integers(0, 255, (100, 8, 8), dtype=np.uint8),
             test_labels=_labels(100, 5, 2)[:, None])
    assert main([str(pooled), "--hospitals", "a,b,c", "--alpha", "0.5", "--out", str(tmp_path / "sites")]) == 0
    out = capsys.readouterr().out
    assert "hospital" in out and "+data.files={a:" in out
    sizes = {"train": 0, "test": 0}
    for name in "abc":
        train, test = load_medmnist(CLS, name, str(tmp_path / "sites" / f"{name}.npz"))
        sizes["train"] += len(train)
        sizes["test"] += len(test)
        assert train.tensors[0].shape[1:] == (1, 8, 8) and float(train.tensors[0].max()) <= 1.0
    assert sizes == {"train": 400, "test": 100}
    assert not list((tmp_path / "sites").glob(".*"))  # no temporary file left behind
    assert main([str(tmp_path / "missing.npz"), "--alpha", "1", "--out", str(tmp_path / "x")]) == 2
    assert "not an .npz archive" in capsys.readouterr().err
