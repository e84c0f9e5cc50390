"""Book-keeping (BK) DP-SGD: exact per-sample clipping with ONE forward and ONE backward.

    privacy.grad_sample_mode=bk  ->  carefl.privacy.make_private builds a BKPrivacyEngine:
    BKModule (the net, hooked)  +  BKOptimizer (Opacus' DPOptimizer, its clipping replaced)

Bu, Wang, Zha, Karypis, "Differentially private optimization on large model at small cost"
(ICML 2023), on top of mixed ghost clipping (Bu, Mao, Xu, NeurIPS 2022). Opacus' Poisson
sampling, noise, gradient scaling and accountant are used unchanged; only the clipped sum
``sum_i c_i grad_i`` that DPOptimizer.clip_and_accumulate stores in ``p.summed_grad`` is
computed differently -- exactly: the same quantity as Opacus', up to float rounding.

Why hand-written: Opacus' hooks materialise every per-sample gradient of every layer ON TOP of
the ordinary backward (which also computes batch weight gradients that DP then throws away),
and clip them in a separate pass. Opacus' fast gradient clipping (grad_sample_mode="ghost")
has ghost norms only for Linear and Embedding, materialises every other layer, and runs a
SECOND backward for the clipped gradient. Our nets are conv nets (Conv, ConvTranspose,
GroupNorm, PReLU), where neither saves anything.

One step
--------
Notation for one layer and a batch of B records: ``a`` its input, ``g = dL/d(out)`` its output
gradient. With Opacus' default ``loss_reduction="mean"`` a sample's gradient is B times its
share of the mean loss (what Opacus clips): the rules run on ``g`` and the factor B is applied
to the norms and the clip factors.

1. Forward (BKModule.forward, training mode with grad enabled). A forward pre-hook on each
   layer with trainable parameters sets them to ``requires_grad=False`` for the duration of
   its own call, so autograd records no weight gradient for any layer. A forward hook stores
   ``a`` and puts a hook on the output tensor that receives ``g`` (once, summed over all uses
   of that output). The output of a layer that reads the data (input without grad) would then
   not require grad: it passes through ``_Tap``, an identity tied to a scalar leaf that
   requires grad, so its ``g`` still arrives and autograd computes neither its weight nor its
   input gradient.
2. Backward (``loss.backward()``): autograd computes activation gradients only. When a layer's
   ``g`` arrives, its rule (below) computes the squared per-sample norms ``n2_l`` (shape (B,))
   of that layer's per-sample gradients and keeps what its clipped sum needs.
3. Step (BKOptimizer.pre_step): ``||grad_i|| = sqrt(sum_l n2_l[i])`` over ALL layers (flat
   clipping, as Opacus); ``c_i = min(1, C / (||grad_i|| + 1e-6))``, Opacus' formula; each
   parameter's ``p.summed_grad = sum_i c_i grad_i``. Then Opacus' add_noise, scale_grad and
   step hook (the accountant), unchanged.

Rules (each an algebraic identity for the layer's per-sample gradient, hence exact)
-----------------------------------------------------------------------------------
Convolution (Conv1d/2d/3d; padding_mode="zeros", numeric padding, any stride, dilation,
groups). ``U_i`` (D x L): sample i's unfolded input, D = C_in/groups * prod(kernel), one column
per output position (L of them); ``G_i`` (p x L): its output gradient, p = C_out. The
per-sample weight gradient is ``W_i = G_i U_i^T`` (p x D); its norm comes one of two ways:

- materialise: all ``W_i`` at once, as ONE grouped convolution weight gradient with the batch
  folded into the channels (input ``(1, B*C_in, ...)``, output gradient ``(1, B*C_out, ...)``,
  ``groups = B*groups``; ``torch.ops.aten.convolution_backward``, which also returns the
  per-sample bias gradients); with one input channel (a first layer, D = prod(kernel)) one
  ``bmm`` of ``G_i`` and the unfolded input instead, about twice as fast on CPU. Cost about one
  ordinary weight gradient, memory B x |W|.
  ``n2 = ||W_i||^2``; clipped sum ``sum_i c_i W_i`` (one matrix-vector product).
- ghost norm (groups = 1): ``||G_i U_i^T||_F^2 = sum_{s,t} (U_i^T U_i)[s,t] (G_i^T G_i)[s,t]``,
  two L x L Gram matrices per sample (cost B L^2 (D + p)), no per-sample gradient; the clipped
  sum is ONE ordinary weight gradient of the per-sample-scaled output gradient,
  ``sum_i c_i G_i U_i^T = weight_grad(c * g, a)``.

Convolutions that read the SAME input tensor with the same kernel, stride, padding and dilation
(groups = 1, both materialised: a MONAI ResidualUnit's first convolution and its strided
residual) are materialised together: their output gradients concatenated along the channels,
``(B, p1 + p2, *S_out)``, go through ONE grouped call, whose ``(B, p1 + p2, D)`` per-sample
gradients are split back by channel (views). The first ``g`` to arrive waits for the other's.

Ghost is chosen when ``2 L (D + p) < D p`` (:func:`_use_ghost`: wide layers at low resolution,
e.g. DenseNet's last blocks; measured on CPU), materialise otherwise. A 1x1 stride-1 unpadded
convolution is a Linear over positions (below). Bias: ``sum_s G_i[:, s]`` (B x p).

ConvTranspose (1d/2d/3d): the adjoint of a transposed convolution is the convolution with the
same kernel, stride, padding and dilation, so ``W_i[c_in, (c_out, k)] = sum_x a_i[c_in, x]
unfold(g_i)[(c_out, k), x]`` over the L INPUT positions x: ghost norm from the Grams of ``a_i``
and ``unfold(g_i)``, materialised by the same grouped call with ``transposed=True`` (the
forward's output_padding is read off the shapes).

Linear (input ``(B, *, in)``, T positions) and 1x1 convolutions: ``W_i = sum_t g_it a_it^T``,
materialised by one ``bmm`` or by the ghost norm with L = T (for T = 1 it is
``||g_i||^2 ||a_i||^2``); the ghost clipped sum is the layer's ordinary weight gradient of
``c * g`` (one matrix product).

GroupNorm (affine): ``dgamma_i[c] = sum_s g_i[c, s] xhat_i[c, s]`` with ``xhat`` the normalised
input, recomputed as ``F.group_norm(a, groups, eps=eps)`` (Opacus' formula);
``dbeta_i[c] = sum_s g_i[c, s]``. Materialised (B x C).

PReLU: ``dalpha_i = sum of g_i * min(a_i, 0)`` over positions (and channels when
num_parameters = 1): d prelu(x) / d alpha is x for x < 0, else 0. Materialised.

Against Opacus (tests/test_dp_bk.py): per-sample norms and every ``p.summed_grad`` equal
grad_sample_mode="hooks" on the same batch and weights (float64 to 1e-9, float32 to 1e-5
relative) for UNet, BasicUNet, DenseNet121 and the classifier in 2D, UNet and the classifier
in 3D, and for every rule both ways (ghost and materialised) in 1D, 2D and 3D; trained weights
and the accountant's history after train_epochs equal hooks' for the same batches and noise.

Cost: CPU time of one DP step over one plain step (forward, loss, backward, SGD step), steps
interleaved, one thread, benchmarks/bench_dp.py (BENCHMARKS.md section 6 has the table and the
load): batch 16 at 64 x 64, UNet 1.2, BasicUNet 1.1-1.2, classifier 1.4-1.6, DenseNet121
1.5-1.6; 3D batch 4 at 32^3, UNet 1.1-1.3, classifier 1.3-1.4 (Opacus hooks 2.2-3.4). What
remains, from the profile: the per-sample convolution gradients (the grouped weight gradient
costs about twice the batch one on CPU: the classifier's 3 such calls are ~1/3 of its plain
step), for DenseNet also Opacus' own noise (7M Gaussian draws, ~9% of its plain step),
GroupNorm's recomputed ``xhat`` (~12%) and the step-time read of its 138 MB of materialised
per-sample gradients.

Refused with an error, never silently wrong
-------------------------------------------
- a trainable parameter owned by a module type without a rule (LayerNorm, Embedding, ...), a
  convolution with padding_mode != "zeros" or string padding, a parameter shared by two
  modules: when wrapping (and at every forward, for parameters unfrozen later);
- a layer that runs twice in one forward (its gradient would mix two uses): at the 2nd call;
- a trainable layer that did not run forward or got no gradient (Opacus raises too); a
  parameter that autograd gave a gradient although its layer was hooked (used functionally
  outside its module); a second backward through one forward; a new forward before the
  previous backward was consumed by ``optimizer.step()`` / ``zero_grad()`` (no accumulation).

Only BKOptimizer makes gradients: ``p.grad`` after ``loss.backward()`` is None (autograd computes
no weight gradient at all), and ``optimizer.pre_step()`` sets it to
the clipped, noised, scaled gradient. In eval mode or under ``torch.no_grad`` the wrapper is a
plain call of the net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn

#: per parameter: clip factors (B,) -> the clipped sum sum_i c_i grad_i, shaped like the parameter
Summer = Callable[[torch.Tensor], torch.Tensor]
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _use_ghost(positions: int, d: int, p: int) -> bool:
    """Ghost norm (two positions x positions Gram matrices per sample, then one batch weight
    gradient) rather than the materialised per-sample weight gradients (d x p per sample).

    FLOP counts favour materialising almost always (it does the weight gradient's work once), but
    writing and reading B x d x p floats and the many small per-sample products are slow: timed
    per layer on CPU (batch 16, one thread, DenseNet/UNet shapes), the Gram route wins once
    ``2 L (d + p) < d p``: wide layers at low resolution (DenseNet's last blocks).
    """
    return 2 * positions * (d + p) < d * p


def _ghost_sq(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||g_i u_i^T||_F^2`` for u (B, D, L), g (B, p, L), without forming g_i u_i^T."""
    return (torch.bmm(u.transpose(1, 2), u) * torch.bmm(g.transpose(1, 2), g)).sum((1, 2))


def _sq(per_sample: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each sample's slice of per_sample (B, ...)."""
    return torch.linalg.vector_norm(per_sample.reshape(per_sample.shape[0], -1), dim=1).square()


def _weighted(per_sample: torch.Tensor) -> Summer:
    """The clipped sum of materialised per-sample gradients (B, *shape): sum_i c_i per_sample[i]."""
    return lambda c: (c @ per_sample.reshape(per_sample.shape[0], -1)).view(per_sample.shape[1:])


def _per_sample_scaled(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """g (B, ...) with sample i multiplied by c[i]."""
    return g * c.view(-1, *[1] * (g.dim() - 1))


def _outer(left: torch.Tensor, right: torch.Tensor, shape, batch_grad: Summer) -> tuple[torch.Tensor, Summer]:
    """(n2, summer) of per-sample gradients ``left_i @ right_i^T`` (left (B, r, L), right (B, k, L)),
    shaped ``shape``: a Linear over L positions, or a 1x1 stride-1 convolution. ``batch_grad(c)``
    is the layer's ordinary weight gradient of the output gradient scaled by c (the ghost sum)."""
    if _use_ghost(left.shape[2], left.shape[1], right.shape[1]):
        return _ghost_sq(right, left), batch_grad
    per_sample = torch.bmm(left, right.transpose(1, 2)).view(left.shape[0], *shape)
    return _sq(per_sample), _weighted(per_sample)


def _unfold(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Convolution patches of x (B, C, *S): (B, C * prod(kernel), L), any number of spatial dims."""
    b, ch, n = x.shape[0], x.shape[1], len(kernel)
    x = F.pad(x, [q for pad in reversed(padding) for q in (pad, pad)])
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]  # appends a kernel axis
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))  # B, C, *kernel, *positions
    return x.reshape(b, ch * math.prod(kernel), -1)


# ---- rules: (module, a, g, trainable parameter names) -> [(name, n2 (B,), summer)] ----------


def _conv_rule(m: nn.Module, a: torch.Tensor, g: torch.Tensor, names: set[str]):
    transposed = isinstance(m, _CONV_T)
    b, n = a.shape[0], m.weight.dim() - 2
    bias = "bias" in names and m.bias is not None
    out, bias_grad = [], None
    if "weight" in names:
        if transposed:  # output_padding as the forward used it (output_size may have set it)
            full = [(i - 1) * s - 2 * p + d * (k - 1) + 1 for i, s, p, d, k in
                    zip(a.shape[2:], m.stride, m.padding, m.dilation, m.kernel_size)]
            out_pad = [o - f for o, f in zip(g.shape[2:], full)]
        else:
            out_pad = [0] * n

        def grads(go, x, groups, weight_shape, bias_sizes=None):
            return torch.ops.aten.convolution_backward(
                go, x, a.new_empty(weight_shape), bias_sizes, m.stride, m.padding, m.dilation,
                transposed, out_pad, groups, [False, True, bias_sizes is not None])

        if transposed:  # positions: the input's; unfolded side: the output gradient
            positions, d, p = math.prod(a.shape[2:]), m.out_channels * math.prod(m.kernel_size), m.in_channels
        else:
            positions, d, p = math.prod(g.shape[2:]), m.in_channels * math.prod(m.kernel_size), m.out_channels
        def batch_grad(c):  # the ghost clipped sum: one ordinary weight gradient of c * g
            return grads(_per_sample_scaled(g, c), a, 1, m.weight.shape)[1]

        if _pointwise(m):
            left, right = (a, g) if transposed else (g, a)
            out.append(("weight", *_outer(left.reshape(b, left.shape[1], -1), right.reshape(b, right.shape[1], -1),
                                          m.weight.shape, batch_grad)))
        elif m.groups == 1 and _use_ghost(positions, d, p):
            if transposed:
                unf = _unfold(g, m.kernel_size, m.stride, m.padding, m.dilation)
                n2 = _ghost_sq(unf[..., :positions], a.reshape(b, p, -1))
            else:
                n2 = _ghost_sq(_unfold(a, m.kernel_size, m.stride, m.padding, m.dilation), g.reshape(b, p, -1))
            out.append(("weight", n2, batch_grad))
        elif not transposed and m.groups == 1:
            return _fused_conv_rules([m], a, [g], [names])[0]
        else:  # all per-sample gradients at once: the batch folded into the groups
            _, weight, bias_grad = grads(g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), b * m.groups,
                                         (b * m.weight.shape[0], *m.weight.shape[1:]),
                                         [b * m.out_channels] if bias else None)
            weight = weight.view(b, *m.weight.shape)
            out.append(("weight", _sq(weight), _weighted(weight)))
    if bias:
        per_sample = g.reshape(b, g.shape[1], -1).sum(2) if bias_grad is None else bias_grad.view(b, -1)
        out.append(("bias", _sq(per_sample), _weighted(per_sample)))
    return out


def _per_sample_conv(m: nn.Module, a: torch.Tensor, g: torch.Tensor, bias: bool):
    """Per-sample weight and bias gradients, (B, p, C_in, *kernel) and (B, p) (None unless ``bias``),
    of convolutions with m's geometry (groups = 1) on input ``a`` with output gradient ``g`` (B, p, *S_out).

    One input channel (a first layer): ``G_i U_i^T``, one ``bmm`` over the unfolded input (D =
    prod(kernel) rows, small), about twice as fast on CPU as the grouped call, which is used
    otherwise (the batch folded into the groups, see the module docstring)."""
    b, p = g.shape[:2]
    if m.in_channels == 1:
        g_flat = g.reshape(b, p, -1)
        weight = torch.bmm(g_flat, _unfold(a, m.kernel_size, m.stride, m.padding, m.dilation).transpose(1, 2))
        return weight.view(b, p, *m.weight.shape[1:]), g_flat.sum(2) if bias else None
    _, weight, bias_grad = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), a.new_empty((b * p, *m.weight.shape[1:])),
        [b * p] if bias else None, m.stride, m.padding, m.dilation, False, [0] * (a.dim() - 2), b, [False, True, bias])
    return weight.view(b, p, *m.weight.shape[1:]), bias_grad.view(b, p) if bias else None


def _fused_conv_rules(modules: list[nn.Module], a: torch.Tensor, gs: list[torch.Tensor], names: list[set[str]]):
    """:func:`_conv_rule`'s materialised route for convolutions of one geometry that read the same
    input ``a`` (a MONAI ResidualUnit's first convolution and its strided residual): their output
    gradients concatenated along the channels, ``(B, sum p, *S_out)``, make ONE grouped weight
    gradient (input unfolded once, one call); its (B, sum p, ...) per-sample gradients are split
    back by channel, as views. Returns each module's [(name, n2, summer)]."""
    biased = ["bias" in trainable and mod.bias is not None for mod, trainable in zip(modules, names)]
    weight, bias = _per_sample_conv(modules[0], a, gs[0] if len(gs) == 1 else torch.cat(gs, 1), any(biased))
    out, start = [], 0
    for mod, with_bias in zip(modules, biased):
        rows = slice(start, start + mod.out_channels)
        start = rows.stop
        grads = [("weight", _sq(weight[:, rows]), _weighted(weight[:, rows]))]
        if with_bias:
            grads.append(("bias", _sq(bias[:, rows]), _weighted(bias[:, rows])))
        out.append(grads)
    return out


def _fusion_key(m: nn.Module, x: torch.Tensor, output: torch.Tensor, trainable: set[str]) -> Optional[tuple]:
    """Convolutions with equal keys read the same input with the same geometry and take the
    materialised route: their per-sample gradients can come from one call (:func:`_fused_conv_rules`).
    None: a layer that is not such a convolution."""
    if type(m) not in _CONV or m.groups != 1 or "weight" not in trainable or _pointwise(m):
        return None
    if _use_ghost(output[0, 0].numel(), m.in_channels * math.prod(m.kernel_size), m.out_channels):
        return None
    return (type(m), m.kernel_size, m.stride, m.padding, m.dilation, x.data_ptr(), x.shape, x.stride(), x.dtype,
            x._version)


def _pointwise(m: nn.Module) -> bool:
    """A 1x1 stride-1 unpadded ungrouped (transposed) convolution: a Linear over positions."""
    return m.groups == 1 and all(v == 1 for v in (*m.kernel_size, *m.stride)) and not any(m.padding)


def _linear_rule(m: nn.Linear, a: torch.Tensor, g: torch.Tensor, names: set[str]):
    b = a.shape[0]
    left = g.reshape(b, -1, m.out_features).transpose(1, 2)  # (B, out, T)
    out = []
    if "weight" in names:
        out.append(("weight", *_outer(left, a.reshape(b, -1, m.in_features).transpose(1, 2), m.weight.shape,
                                      lambda c: _per_sample_scaled(g, c).reshape(-1, m.out_features).t()
                                      @ a.reshape(-1, m.in_features))))
    if "bias" in names and m.bias is not None:
        per_sample = left.sum(2)
        out.append(("bias", _sq(per_sample), _weighted(per_sample)))
    return out


def _group_norm_rule(m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, names: set[str]):
    b, c = a.shape[0], a.shape[1]
    out = []
    if "weight" in names and m.weight is not None:
        xhat = F.group_norm(a, m.num_groups, eps=m.eps)
        per_sample = xhat.mul_(g).reshape(b, c, -1).sum(2)
        out.append(("weight", _sq(per_sample), _weighted(per_sample)))
    if "bias" in names and m.bias is not None:
        per_sample = g.reshape(b, c, -1).sum(2)
        out.append(("bias", _sq(per_sample), _weighted(per_sample)))
    return out


def _prelu_rule(m: nn.PReLU, a: torch.Tensor, g: torch.Tensor, names: set[str]):
    if "weight" not in names:
        return []
    b = a.shape[0]
    prod = g * a.clamp(max=0)
    per_sample = prod.reshape(b, -1).sum(1, keepdim=True) if m.num_parameters == 1 else \
        prod.reshape(b, prod.shape[1], -1).sum(2)
    return [("weight", _sq(per_sample), _weighted(per_sample))]


_RULES = {**{t: _conv_rule for t in _CONV + _CONV_T},
          nn.Linear: _linear_rule, nn.GroupNorm: _group_norm_rule, nn.PReLU: _prelu_rule}


def _unsupported(m: nn.Module) -> Optional[str]:
    """Why module m has no exact BK rule (None if it has one)."""
    if type(m) not in _RULES:
        return f"no BK rule for {type(m).__name__}"
    if isinstance(m, _CONV + _CONV_T):
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only 'zeros' has a BK rule)"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r} (only numeric padding has a BK rule)"
    return None


# ---- the model wrapper -------------------------------------------------------------------


@dataclass
class _Layer:
    """One module that owns parameters, and what the current step recorded for it."""

    name: str
    module: nn.Module
    names: list[str]  # its own parameters' names
    unsupported: Optional[str]  # why it has no BK rule (None: it has one)
    trainable: set[str] = field(default_factory=set)  # those that require grad (checked every forward)
    off: list[nn.Parameter] = field(default_factory=list)  # switched to requires_grad=False in its forward
    ran: bool = False  # forward ran in this step (with its parameters off: autograd gives them no gradient)
    a: Optional[torch.Tensor] = None  # its input, until its gradient arrives
    fused: Optional[list] = None  # the layers (itself included) whose per-sample gradients come from one call
    g: Optional[torch.Tensor] = None  # its output gradient, kept until every fused layer's has arrived
    grads: Optional[list] = None  # [(param name, n2 (B,), summer)] once its gradient arrived


class _Tap(torch.autograd.Function):
    """Identity on a layer output that does not require grad (the layer reads the data and its
    parameters are switched off): through ``anchor``, a scalar leaf that requires grad, the output
    requires grad, so its hook receives g while autograd computes no weight or input gradient for
    the layer. The anchor gets no gradient (None)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return output.detach()  # not a view: later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return None, None


class BKModule(nn.Module):
    """The net, hooked for book-keeping DP-SGD (see the module docstring).

    Stores the net as ``_module`` (as Opacus' GradSampleModule does, so
    ``carefl.models.plain_state_dict`` strips the same prefix).

    Args:
        module: the net; every module that owns a trainable parameter must have a BK rule.
        loss_reduction: "mean" (the loss is the batch mean: per-sample gradients are B times the
            gradient of the loss, as in Opacus) or "sum".
    Raises:
        NotImplementedError: a trainable parameter without an exact rule, or one shared by two
            modules.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean"):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'")
        self._module = module
        self.loss_reduction = loss_reduction
        self._layers: dict[nn.Module, _Layer] = {}
        self._recording = False
        self._batch = 0
        self._generation = 0
        self._anchor = torch.zeros((), requires_grad=True)  # see _Tap
        self._inputs: dict[tuple, list[_Layer]] = {}  # fusion key -> layers of this forward
        owner: dict[int, str] = {}
        for name, m in module.named_modules():  # a module registered twice is met once (and refused if run twice)
            for pname, p in m.named_parameters(recurse=False):
                if owner.setdefault(id(p), f"{name}.{pname}") != f"{name}.{pname}":
                    raise NotImplementedError(
                        f"parameter {name}.{pname} is shared with {owner[id(p)]}: BK needs one owner per parameter")
            if not any(True for _ in m.parameters(recurse=False)):
                continue
            self._layers[m] = _Layer(name, m, [n for n, _ in m.named_parameters(recurse=False)], _unsupported(m))
            if self._layers[m].unsupported is None:
                m.register_forward_pre_hook(self._before)
                m.register_forward_hook(self._after)
        self._check_rules()

    # -- Opacus GradSampleModule API used by carefl.privacy --
    def forbid_grad_accumulation(self) -> None:
        """BK never accumulates: a second backward or forward before the step always raises."""

    def _check_rules(self) -> None:
        for layer in self._layers.values():
            layer.trainable = {n for n in layer.names if getattr(layer.module, n).requires_grad}
            if layer.trainable and layer.unsupported:
                raise NotImplementedError(
                    f"{layer.name or 'the model'} ({type(layer.module).__name__}) has trainable parameters but "
                    f"{layer.unsupported}; freeze them or use privacy.grad_sample_mode=hooks")

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        if self.recorded():
            raise RuntimeError("BK DP-SGD: the previous backward's gradients were not consumed; call "
                               "optimizer.step() or optimizer.zero_grad() before the next forward "
                               "(gradient accumulation is not supported)")
        self.release()
        self._check_rules()
        self._recording = True
        try:
            return self._module(*args, **kwargs)
        finally:
            self._recording = False
            for layer in self._layers.values():  # a forward that raised may have left some off
                _switch(layer.off, True)
                layer.off = []

    def _before(self, module: nn.Module, args) -> None:
        layer = self._layers[module]
        if not self._recording or not layer.trainable:
            return
        if layer.ran:
            raise RuntimeError(f"{layer.name} ({type(module).__name__}) ran twice in one forward: BK DP-SGD needs "
                               "each layer once per forward; use privacy.grad_sample_mode=hooks")
        layer.ran = True
        layer.off = [getattr(module, n) for n in layer.trainable]
        _switch(layer.off, False)

    def _after(self, module: nn.Module, args, output) -> None:
        layer = self._layers[module]
        if not self._recording or not layer.trainable:
            return
        _switch(layer.off, True)
        layer.off = []
        layer.a = args[0].detach()
        self._batch = layer.a.shape[0]
        if not output.requires_grad:  # it reads the data
            output = _Tap.apply(output, self._anchor)
        key = _fusion_key(module, args[0], output, layer.trainable)
        if key is not None:
            layer.fused = self._inputs.setdefault(key, [])
            layer.fused.append(layer)
        generation = self._generation
        output.register_hook(lambda g: self._on_grad(layer, generation, g))
        return output

    def _on_grad(self, layer: _Layer, generation: int, g: torch.Tensor) -> None:
        if generation != self._generation:
            raise RuntimeError("BK DP-SGD: backward through a forward whose step was already released")
        if layer.grads is not None or layer.g is not None:
            raise RuntimeError(f"{layer.name}: second backward through one forward (no gradient accumulation in BK)")
        if layer.fused is None or len(layer.fused) == 1:
            layer.grads = _RULES[type(layer.module)](layer.module, layer.a, g.detach(), layer.trainable)
            layer.a = None
            return
        layer.g = g.detach()
        if all(other.g is not None for other in layer.fused):
            grads = _fused_conv_rules([other.module for other in layer.fused], layer.a,
                                      [other.g for other in layer.fused], [other.trainable for other in layer.fused])
            for other, other_grads in zip(layer.fused, grads):
                other.grads, other.a, other.g = other_grads, None, None

    def recorded(self) -> bool:
        """Whether a backward since the last :meth:`release` recorded gradients."""
        return any(layer.grads is not None or layer.g is not None for layer in self._layers.values())

    def release(self) -> None:
        """Forget the current step (activations, gradients); later hooks of it raise."""
        self._generation += 1
        self._inputs = {}
        for layer in self._layers.values():
            layer.ran, layer.a, layer.fused, layer.g, layer.grads = False, None, None, None, None

    def _complete(self) -> list[_Layer]:
        layers = [layer for layer in self._layers.values() if layer.trainable]
        for layer in layers:
            if layer.grads is None and layer.g is not None:  # a fused partner got no gradient: on its own
                layer.grads = _RULES[type(layer.module)](layer.module, layer.a, layer.g, layer.trainable)
                layer.a, layer.g = None, None
            if layer.grads is None:
                what = "got no gradient in backward" if layer.ran else "did not run in forward"
                raise RuntimeError(f"{layer.name} ({type(layer.module).__name__}) has trainable parameters but {what}; "
                                   "BK DP-SGD (like Opacus) needs every trainable layer in the loss")
            for name in layer.trainable:
                grad = getattr(layer.module, name).grad
                if grad is not None and bool(grad.any()):
                    raise RuntimeError(f"{layer.name}.{name} got a gradient outside its module's forward (used "
                                       "functionally elsewhere?): BK DP-SGD would miss that use")
        return layers

    def _scale(self) -> float:
        return float(self._batch) if self.loss_reduction == "mean" else 1.0

    def per_sample_norms(self) -> torch.Tensor:
        """(B,) L2 norms of the whole model's per-sample gradients of the recorded step."""
        return self._norms(self._complete())

    def _norms(self, layers: list[_Layer]) -> torch.Tensor:
        return self._scale() * sum(n2 for layer in layers for _, n2, _ in layer.grads).sqrt()

    def clipped_sum(self, max_grad_norm: float) -> dict[nn.Parameter, torch.Tensor]:
        """``sum_i c_i grad_i`` per trainable parameter, ``c_i = min(1, C / (||grad_i|| + 1e-6))``.

        Args:
            max_grad_norm: C.
        Returns:
            {parameter: clipped sum, shaped like it}.
        """
        layers = self._complete()
        clip = (max_grad_norm / (self._norms(layers) + 1e-6)).clamp(max=1.0) * self._scale()
        return {getattr(layer.module, name): summer(clip) for layer in layers for name, _, summer in layer.grads}


def _switch(params: list[nn.Parameter], requires_grad: bool) -> None:
    for p in params:
        p.requires_grad_(requires_grad)


# ---- the optimizer and the engine --------------------------------------------------------


class BKOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose clipped sum comes from a :class:`BKModule`.

    A step with records: ``p.summed_grad`` = BKModule.clipped_sum (no ``p.grad_sample`` exists);
    then Opacus' add_noise, scale_grad and step hook (accountant). A step without records (an
    empty Poisson batch: the caller sets ``p.grad_sample`` to ``(0, *p.shape)`` zeros) is
    Opacus' own noise-only path.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: BKModule, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.bk_module = module
        self._bk_step = False

    @property
    def accumulated_iterations(self) -> int:
        """1 for a BK step (BKModule refuses accumulation), else Opacus' count."""
        return 1 if self._bk_step else super().accumulated_iterations

    def clip_and_accumulate(self) -> None:
        """``p.summed_grad`` (+)= the BK clipped sum of the recorded step, then release the step."""
        self._bk_step = self.bk_module.recorded()
        if not self._bk_step:  # an empty batch: Opacus' zero-length p.grad_sample
            return super().clip_and_accumulate()
        clipped = self.bk_module.clipped_sum(self.max_grad_norm)
        for p in self.params:
            if p not in clipped:
                raise RuntimeError("an optimizer parameter has no BK gradient: it is not in the wrapped model, "
                                   "or it was frozen during the forward")
            grad = clipped[p].to(p.dtype)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        self.bk_module.release()

    def pre_step(self, closure=None) -> bool:
        """Clip (BK), then Opacus' noise, scaling and accountant hook; False for a skipped
        (virtual) step, as DPOptimizer.pre_step."""
        if not self.bk_module.recorded():  # nothing recorded: Opacus' own path (an empty batch)
            return super().pre_step(closure)
        # DPOptimizer.pre_step without its look at p.grad_sample, which a BK step never has
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self.bk_module.release()


class BKPrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine with ``grad_sample_mode="bk"``: ``make_private`` runs unchanged
    (validation, data loader, expected batch size, accountant hook) but wraps the model in
    :class:`BKModule` and the optimizer in :class:`BKOptimizer` (make_private prepares the
    model before the optimizer, which is how the optimizer finds its module). Other modes are
    Opacus' own."""

    def _prepare_model(self, module: nn.Module, *, grad_sample_mode: str = "hooks", **kwargs):
        if grad_sample_mode != "bk":
            return super()._prepare_model(module, grad_sample_mode=grad_sample_mode, **kwargs)
        self.validate(module=module, optimizer=None, data_loader=None)
        if not kwargs.get("batch_first", True) or not kwargs.get("wrap_model", True):
            raise ValueError("grad_sample_mode='bk' needs batch_first=True and wrap_model=True")
        self._bk_module = BKModule(module, loss_reduction=kwargs.get("loss_reduction", "mean"))
        return self._bk_module

    def _prepare_optimizer(self, *, optimizer, grad_sample_mode: str = "hooks", noise_generator=None,
                           distributed: bool = False, clipping: str = "flat", **kwargs):
        if grad_sample_mode != "bk":
            return super()._prepare_optimizer(optimizer=optimizer, grad_sample_mode=grad_sample_mode,
                                              noise_generator=noise_generator, distributed=distributed,
                                              clipping=clipping, **kwargs)
        if distributed or clipping != "flat":
            raise ValueError("grad_sample_mode='bk' supports flat clipping on one process only")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        return BKOptimizer(optimizer, module=self._bk_module, generator=generator,
                           secure_mode=self.secure_mode, **kwargs)
