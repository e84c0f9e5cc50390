"""Metrics against their formulas; local training really trains; FedProx pulls to the anchor."""

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from carefl.config import compose_config
from carefl.models import build_model
from carefl.tasks import compute_metrics
from carefl.training import evaluate, make_loader, make_optimizer, train_epochs

SEG = OmegaConf.create({"kind": "segmentation", "loss": "dice", "num_classes": 1})
CLS = OmegaConf.create({"kind": "classification", "loss": "ce", "num_classes": 2})


def test_dice_is_2tp_over_sizes_averaged_over_images():
    labels = torch.zeros(2, 1, 4, 4)
    labels[0, 0, :2, :2] = 1  # 4 pixels
    labels[1, 0, 0, :] = 1  # 4 pixels
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, :2, :1] = 5  # 2 of 4 right, no false positive -> 2*2/(2+4) = 2/3
    logits[1, 0, 0, :] = 5
    logits[1, 0, 1, :] = 5  # 4 right + 4 false positive -> 2*4/(8+4) = 2/3
    assert abs(compute_metrics(SEG, logits, labels)["dice"] - 2 / 3) < 1e-6


def test_boundary_metrics_by_hand_and_their_empty_cases():
    labels = torch.zeros(3, 1, 8, 8)
    labels[0, 0, 2:6, 2:6] = 1
    labels[1, 0, 2:4, 2:4] = 1
    logits = torch.full((3, 1, 8, 8), -5.0)
    logits[0, 0, 2:6, 2:7] = 5  # one column too many: every boundary voxel within 1, the farthest 1 away
    # image 1: the lesion is missed; image 2: nothing to find, nothing found
    metrics = compute_metrics(SEG, logits, labels)
    diagonal = 8 * 2 ** 0.5
    assert metrics["hd95"] == pytest.approx((1.0 + diagonal + 0.0) / 3)
    assert metrics["surface_dice"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)


def test_sensitivity_and_specificity_by_hand():
    labels = torch.tensor([1, 1, 1, 0, 0])
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # TP TP FN TN FP
    metrics = compute_metrics(CLS, logits, labels)
    assert metrics["sensitivity"] == pytest.approx(2 / 3) and metrics["specificity"] == pytest.approx(1 / 2)


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_images():
    from carefl.tasks import bootstrap_ci

    same = torch.full((50,), 0.7, dtype=torch.float64)
    assert bootstrap_ci(lambda idx: same[idx].mean(dim=1), 50) == pytest.approx((0.7, 0.7))
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (10, 160):
        values = torch.rand(n, generator=gen, dtype=torch.float64)
        low, high = bootstrap_ci(lambda idx: values[idx].mean(dim=1), n)
        assert low <= float(values.mean()) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x as wide for 16x fewer images
    labels = torch.zeros(1, 1, 4, 4)
    metrics = compute_metrics(SEG, torch.full((1, 1, 4, 4), -5.0), labels)
    assert metrics["dice_ci_low"] == metrics["dice_ci_high"] == metrics["dice"] == 1.0  # one image: no spread


def test_resampled_auc_equals_monais_auc_of_every_resample_written_out():
    """The bootstrap's vectorised AUC (Mann-Whitney over score levels, with multiplicities) is
    MONAI's compute_roc_auc on each resample listed out, under compute_metrics' rules: classes
    absent from a resample left out, binary = logit 1 - logit 0, one class = fraction correct.
    Adversarial inputs: heavy ties (scores on a 3-value grid), duplicates, one-class and
    two-example resamples, classes missing from the split, K = 2, 3 and 10."""
    from monai.metrics import compute_roc_auc

    from carefl.tasks import resampled_auc

    def reference(scores, labels, rows):
        out = []
        for idx in rows:
            s_, y = scores[idx], labels[idx]
            classes = y.unique().tolist()
            if len(classes) == 1:
                out.append(float((s_.argmax(dim=1) == y).double().mean()))
            elif s_.shape[1] == 2:
                out.append(float(compute_roc_auc(s_[:, 1] - s_[:, 0], y.double())))
            else:
                lp = torch.log_softmax(s_, dim=1)
                out.append(sum(float(compute_roc_auc(lp[:, c], (y == c).double())) for c in classes) / len(classes))
        return torch.tensor(out, dtype=torch.float64)

    gen = torch.Generator().manual_seed(3)
    for n, k, grid, classes in [(2, 2, 0, 2), (3, 2, 3, 2), (40, 2, 0, 2), (40, 2, 3, 2), (25, 3, 3, 3),
                                (60, 10, 0, 4), (60, 10, 3, 10), (1, 3, 0, 3), (30, 3, 0, 1)]:
        scores = torch.randn(n, k, generator=gen, dtype=torch.float64)
        if grid:  # ties everywhere, inside and across classes
            scores = torch.randint(0, grid, (n, k), generator=gen).double()
        labels = torch.randint(0, classes, (n,), generator=gen)
        rows = torch.randint(0, n, (200, n), generator=gen)
        got = resampled_auc(scores, labels, rows)
        assert got.shape == (200,) and torch.allclose(got, reference(scores, labels, rows), atol=1e-12, rtol=0), (n, k)
    assert torch.equal(resampled_auc(scores, labels, torch.arange(30).unsqueeze(0)),
                       reference(scores, labels, [torch.arange(30)]))


def test_auc_and_accuracy_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    p1 = torch.tensor([0.1, 0.6, 0.4, 0.9])  # pairs (pos>neg): (0.4>0.1),(0.9>0.1),(0.9>0.6) = 3/4
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))], dim=1)
    metrics = compute_metrics(CLS, logits, labels)
    assert abs(metrics["auc"] - 0.75) < 1e-6
    assert abs(metrics["accuracy"] - 0.5) < 1e-6  # predictions 0,1,0,1


def _tiny_seg():
    cfg = compose_config("data.image_size=16 model.channels=[4,8,16] privacy=none")
    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16)
    y = (x > 0.6).float()  # learnable: bright pixels are the lesion
    return cfg, TensorDataset(x, y)


def test_local_training_lowers_the_loss_and_raises_dice():
    cfg, data = _tiny_seg()
    model = build_model(cfg)
    before = evaluate(model, data, cfg.task)["dice"]
    result = train_epochs(model, make_optimizer(model, "adam", 0.01), make_loader(data, 8, 0), cfg.task, epochs=15)
    assert result.steps == 30 and result.num_examples == 16
    assert evaluate(model, data, cfg.task)["dice"] > before + 0.2


def test_fedprox_term_keeps_weights_near_the_global_model():
    cfg, data = _tiny_seg()
    drift = {}
    for mu in (0.0, 2.0):  # lr * mu well below the SGD stability limit
        model = build_model(cfg)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_epochs(model, make_optimizer(model, "sgd", 0.05), make_loader(data, 8, 0), cfg.task, 5, prox_mu=mu)
        drift[mu] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    assert drift[2.0] < 0.5 * drift[0.0]
