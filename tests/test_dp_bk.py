"""carefl.dp_bk: book-keeping DP-SGD equals Opacus' hooks (norms, clipped sums, accounting) on every net."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from carefl import dp_bk, privacy
from carefl.config import compose_config
from carefl.dp_bk import BKModule, BKOptimizer
from carefl.models import build_model, plain_state_dict
from carefl.privacy import make_private
from carefl.tasks import build_loss
from carefl.training import train_epochs

torch.set_num_threads(1)
pytestmark = [pytest.mark.filterwarnings(f"ignore:{m}") for m in (
    "Secure RNG turned off", "Full backward hook", "Optimal order is the largest alpha")]

C = 0.05  # below most per-sample norms: the clip factors differ per sample
TINY = {  # overrides for a small net per model; side = image side
    "unet": (["model.channels=[4,8,8]", "model.strides=[2,2]", "model.norm_groups=2"], 16),
    "basicunet": (["model.features=[4,4,8,8,8,4]", "model.norm_groups=2"], 16),
    "classifier": (["model.channels=[4,8]", "model.strides=[2,2]", "model.norm_groups=2"], 16),
    "densenet121": (["model.norm_groups=8"], 32),  # fixed widths; 32 = its smallest input
}
CASES = [(name, dims) for name in TINY for dims in (2, 3)]  # every model in conf/model, 2D and 3D
#: the 3D side per model: the smallest its net takes (basicunet pools 4 times, densenet121 needs >= 29)
SIDE_3D = {"unet": 8, "classifier": 8, "basicunet": 16, "densenet121": 32}


def _setup(name: str, dims: int, batch: int = 3):
    """(cfg, model, (x, y)) for model ``name`` on the ``dims``-D task of its kind."""
    overrides, side = TINY[name]
    kind = "seg" if name in ("unet", "basicunet") else "cls"
    side = SIDE_3D[name] if dims == 3 else side
    cfg = compose_config([f"task={kind}{dims}d", f"model={name}", *overrides])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *[side] * dims, generator=g)
    y = ((torch.rand(batch, 1, *[side] * dims, generator=g) > 0.5).float() if kind == "seg"
         else torch.randint(0, 2, (batch,), generator=g))
    return cfg, build_model(cfg), (x, y)


def _private(model, data, mode, sigma=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_private(model, opt, DataLoader(TensorDataset(*data), batch_size=len(data[0])),
                        noise_multiplier=sigma, max_grad_norm=C, grad_sample_mode=mode)


def _clipped(cfg, model, data, mode, dtype):
    """(per-sample norms, [p.summed_grad]) of one step on the batch ``data``."""
    model = copy.deepcopy(model).to(dtype)
    x, y = data[0].to(dtype), data[1].to(dtype) if data[1].is_floating_point() else data[1]
    dp_model, opt, _, _ = _private(model, (x, y), mode)
    opt.zero_grad()
    build_loss(cfg.task)(dp_model(x), y).backward()
    if mode == "bk":
        norms = dp_model.per_sample_norms()
    else:
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in opt.grad_samples], 1).norm(2, dim=1)
    opt.clip_and_accumulate()
    return norms, [p.summed_grad for p in opt.params]


@pytest.mark.parametrize("name, dims", CASES, ids=lambda v: str(v))
def test_bk_norms_and_clipped_sums_equal_opacus_hooks(name, dims):
    cfg, model, data = _setup(name, dims)
    for dtype, rel in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        hooks_norms, hooks_sums = _clipped(cfg, model, data, "hooks", dtype)
        bk_norms, bk_sums = _clipped(cfg, model, data, "bk", dtype)
        assert (hooks_norms > C).any()  # clipping is active
        assert torch.allclose(bk_norms, hooks_norms, rtol=rel, atol=0), (dtype, bk_norms, hooks_norms)
        assert [b.shape for b in bk_sums] == [h.shape for h in hooks_sums]
        # relative to the whole clipped sum: single entries (a conv bias before a GroupNorm) are ~0
        scale = torch.cat([h.flatten() for h in hooks_sums]).norm()
        for bk, hooks in zip(bk_sums, hooks_sums):
            assert (bk - hooks).norm() <= rel * scale, (dtype, (bk - hooks).norm() / scale)


class _Zoo(torch.nn.Module):
    """Every rule's corner: stride, dilation, groups, 1x1 (pointwise) convolutions, output_padding,
    per-channel PReLU, a Linear over positions (T > 1) and one over samples (T = 1)."""

    def __init__(self, dims: int):
        super().__init__()
        conv, convt = getattr(torch.nn, f"Conv{dims}d"), getattr(torch.nn, f"ConvTranspose{dims}d")
        self.net = torch.nn.Sequential(
            conv(1, 4, 3, stride=2, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.PReLU(4),
            conv(4, 4, 3, padding=2, dilation=2, groups=2), torch.nn.GroupNorm(1, 4), conv(4, 4, 1),
            convt(4, 3, 3, stride=2, padding=1, output_padding=1), torch.nn.PReLU(), convt(3, 3, 1),
            convt(3, 2, 2, stride=1, bias=False))
        self.mix, self.head = torch.nn.Linear(2, 5), torch.nn.Linear(5, 2)

    def forward(self, x):
        h = self.net(x).flatten(2).transpose(1, 2)  # (B, positions, channels)
        return self.head(self.mix(h).mean(1))


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialise"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_every_rule_both_ways_equals_opacus_hooks(monkeypatch, dims, ghost):
    monkeypatch.setattr(dp_bk, "_use_ghost", lambda *shape: ghost)
    cfg = compose_config(["task=cls2d", "model=classifier"])
    torch.manual_seed(0)
    model = _Zoo(dims)
    data = (torch.randn(4, 1, *[6] * dims), torch.tensor([0, 1, 1, 0]))
    hooks_norms, hooks_sums = _clipped(cfg, model, data, "hooks", torch.float64)
    bk_norms, bk_sums = _clipped(cfg, model, data, "bk", torch.float64)
    assert (hooks_norms > C).any()
    assert torch.allclose(bk_norms, hooks_norms, rtol=1e-10, atol=0)
    for bk, hooks in zip(bk_sums, hooks_sums, strict=True):
        assert torch.allclose(bk, hooks, rtol=1e-9, atol=1e-12)


def test_bk_step_is_opacus_step_with_bk_clipped_sum(monkeypatch):
    """Noise, scaling and the accountant are Opacus': with noise switched off one pre_step
    gives p.grad = clipped sum / expected batch size, and the accountant records the step."""
    cfg, model, data = _setup("classifier", 2)
    monkeypatch.setattr(torch, "normal", lambda mean, std, size, **kw: torch.zeros(size))
    dp_model, opt, loader, engine = _private(model, data, "bk")
    assert isinstance(dp_model, BKModule) and isinstance(opt, BKOptimizer)
    opt.zero_grad()
    build_loss(cfg.task)(dp_model(data[0]), data[1]).backward()
    # autograd computed no weight gradient, not even for the two convolutions that read the data
    assert all(p.grad is None for p in model.parameters())
    clipped = dp_model.clipped_sum(C)
    assert opt.pre_step()
    for p in opt.params:
        assert torch.allclose(p.grad, clipped[p] / opt.expected_batch_size, rtol=1e-6, atol=1e-12)
    assert engine.accountant.history == [(1.0, 1.0, 1)]


def test_empty_batch_is_a_noise_only_step():
    cfg, model, data = _setup("unet", 2)
    dp_model, opt, _, engine = _private(model, data, "bk", sigma=2.0)
    opt.zero_grad(set_to_none=True)
    for p in opt.params:  # what train_epochs does for an empty Poisson batch
        p.grad_sample = p.new_zeros((0, *p.shape))
    assert opt.pre_step()
    noise = torch.cat([p.grad.flatten() for p in opt.params]) * opt.expected_batch_size
    assert noise.std().item() == pytest.approx(2.0 * C, rel=0.05)  # N(0, (sigma C)^2), nothing else
    assert engine.accountant.history == [(2.0, 1.0, 1)]


def test_eval_no_grad_and_state_dict_are_the_plain_models():
    cfg, model, data = _setup("unet", 2)
    plain = copy.deepcopy(model)
    dp_model, *_ = _private(model, data, "bk")
    dp_model.eval()
    assert torch.equal(dp_model(data[0]), plain.eval()(data[0]))
    dp_model.train()
    with torch.no_grad():
        assert torch.equal(dp_model(data[0]), plain.train()(data[0]))
    assert not dp_model.recorded()
    assert set(plain_state_dict(dp_model)) == set(plain.state_dict())
    assert all(p.requires_grad for p in dp_model.parameters())


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x)).flatten(1)


def test_refused_layers_raise_clear_errors():
    data = (torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="no BK rule for LayerNorm"):
        _private(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(16)), data, "bk")
    with pytest.raises(NotImplementedError, match="padding_mode='reflect'"):
        _private(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), data, "bk")
    shared = torch.nn.Linear(16, 16)
    tied = torch.nn.Sequential(torch.nn.Flatten(), shared, torch.nn.Linear(16, 16))
    tied[2].weight = shared.weight
    with pytest.raises(NotImplementedError, match="shared"):
        _private(tied, data, "bk")
    frozen = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    frozen[1].requires_grad_(False)
    dp_model, opt, _, _ = _private(frozen, data, "bk")  # a frozen layer needs no rule ...
    frozen[1].weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="LayerNorm"):  # ... until it is unfrozen
        dp_model(data[0])

    dp_model, opt, _, _ = _private(_Twice(), data, "bk")
    with pytest.raises(RuntimeError, match="ran twice in one forward"):
        dp_model(data[0])


class _Heads(torch.nn.Module):
    """Two heads, the loss sees one; ``spare`` never runs."""

    def __init__(self):
        super().__init__()
        self.body, self.used, self.unused, self.spare = (torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        h = self.body(x)
        self.unused(h)
        return self.used(h)


class _Functional(torch.nn.Module):
    """``fc.weight`` used once through ``fc`` and once functionally."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h) + torch.nn.functional.linear(h, self.fc.weight)


class _SharedInput(torch.nn.Module):
    """Two strided convolutions on one input (as a MONAI ResidualUnit's conv and residual): BK
    computes their per-sample gradients in one call; ``use_right=False`` leaves one out of the loss
    (it runs, gets no gradient)."""

    def __init__(self, use_right: bool = True):
        super().__init__()
        self.left, self.right = (torch.nn.Conv2d(2, 3, 3, stride=2, padding=1) for _ in range(2))
        self.head, self.use_right = torch.nn.Linear(3, 2), use_right

    def forward(self, x):
        right = self.right(x)
        h = torch.relu(self.left(x)) + (right if self.use_right else 0)
        return self.head(h.mean((2, 3)))


def test_fused_convolutions_on_one_input(monkeypatch):
    calls = []
    fused = dp_bk._fused_conv_rules
    monkeypatch.setattr(dp_bk, "_fused_conv_rules", lambda modules, *a: calls.append(len(modules)) or fused(modules, *a))
    cfg = compose_config(["task=cls2d", "model=classifier"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), _SharedInput())  # the shared input needs grad
    data = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0]))
    hooks_norms, hooks_sums = _clipped(cfg, model, data, "hooks", torch.float64)
    bk_norms, bk_sums = _clipped(cfg, model, data, "bk", torch.float64)
    assert calls.count(2) == 1 and (hooks_norms > C).any()  # one call for the two
    assert torch.allclose(bk_norms, hooks_norms, rtol=1e-10, atol=0)
    for bk, hooks in zip(bk_sums, hooks_sums, strict=True):
        assert torch.allclose(bk, hooks, rtol=1e-9, atol=1e-12)

    # a fused partner outside the loss is named, and only it
    data = (torch.randn(2, 2, 8, 8), torch.zeros(2, dtype=torch.long))
    dp_model, opt, _, _ = _private(_SharedInput(use_right=False), data, "bk")
    dp_model(data[0]).sum().backward()
    with pytest.raises(RuntimeError, match="right .* got no gradient"):
        opt.pre_step()


def test_accumulation_and_layers_outside_the_loss_raise():
    data = (torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.PReLU(), torch.nn.Linear(3, 2))
    dp_model, opt, _, _ = _private(model, data, "bk")
    opt.zero_grad()
    dp_model(data[0]).sum().backward()
    with pytest.raises(RuntimeError, match="not consumed"):
        dp_model(data[0])
    opt.zero_grad()  # releases the step: a fresh forward/backward is fine
    dp_model(data[0]).sum().backward()
    assert opt.pre_step()

    heads = _Heads()
    dp_model, opt, _, _ = _private(heads, data, "bk")
    dp_model(data[0]).sum().backward()
    with pytest.raises(RuntimeError, match="unused .* got no gradient"):
        opt.pre_step()
    opt.zero_grad()
    heads.unused.requires_grad_(False)
    dp_model(data[0]).sum().backward()
    with pytest.raises(RuntimeError, match="spare .* did not run in forward"):
        opt.pre_step()

    dp_model, opt, _, _ = _private(_Functional(), data, "bk")
    dp_model(data[0]).sum().backward()
    with pytest.raises(RuntimeError, match="fc.weight got a gradient outside its module's forward"):
        opt.pre_step()


@pytest.mark.parametrize("name", ["unet", "classifier"])
def test_training_through_train_epochs_accounts_like_hooks(monkeypatch, name):
    cfg, model, _ = _setup(name, 2)
    side = TINY[name][1]
    g = torch.Generator().manual_seed(3)
    n = 6
    x = torch.randn(n, 1, side, side, generator=g)
    y = ((torch.rand(n, 1, side, side, generator=g) > 0.5).float() if name == "unet"
         else torch.randint(0, 2, (n,), generator=g))
    histories, weights = {}, {}
    for mode in ("hooks", "bk"):
        monkeypatch.setattr(privacy, "entropy_generator", lambda: torch.Generator().manual_seed(5))
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        dp_model, dp_opt, loader, engine = make_private(
            net, opt, DataLoader(TensorDataset(x, y), batch_size=2), noise_multiplier=1.0,
            max_grad_norm=C, grad_sample_mode=mode)
        result = train_epochs(dp_model, dp_opt, loader, cfg.task, epochs=2)
        assert result.steps == 2 * len(loader) == 6
        histories[mode] = engine.accountant.history
        weights[mode] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert histories["bk"] == histories["hooks"] == [(1.0, 1 / 3, 6)]
    # same seeded batches and noise, same clipped sums: the same trained weights (float32 rounding)
    assert torch.allclose(weights["bk"], weights["hooks"], rtol=1e-4, atol=1e-5)
