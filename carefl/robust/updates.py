"""State dicts <-> the update matrix.

Only floating-point entries of the global state dict are aggregated. Non-float entries
(BatchNorm's ``num_batches_tracked``, any int/bool buffer) are **not** aggregated: they carry
no gradient information, averaging counters is meaningless and a Byzantine hospital could
otherwise corrupt them; the new global model keeps the global model's value.
Float buffers (e.g. BatchNorm running statistics) are aggregated like parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def float_keys(global_state: Mapping[str, Tensor]) -> list[str]:
    """Keys of the aggregated (floating-point) entries, in state-dict order."""
    return [k for k, v in global_state.items() if torch.is_floating_point(v)]


def update_dim(global_state: Mapping[str, Tensor]) -> int:
    """d: the float elements of a state dict, the length of one update row."""
    return sum(global_state[k].numel() for k in float_keys(global_state))


def flatten_updates(local_states: Sequence[Mapping[str, Tensor]], global_state: Mapping[str, Tensor]) -> Tensor:
    """float32 ``(n, d)``: row i = hospital i's ``local - global`` over :func:`float_keys`,
    each entry flattened, in state-dict order (d = number of float elements).

    Each hospital's entries are concatenated straight into its row of one preallocated matrix
    (one op per hospital, not one per tensor), then the flattened global state is subtracted
    from all rows at once. States must have been checked with
    :func:`carefl.robust.checks.validate_update` first.
    """
    keys = float_keys(global_state)
    flat_global = torch.cat([global_state[k].detach().reshape(-1).float() for k in keys])
    out = torch.empty(len(local_states), flat_global.numel(), dtype=torch.float32)
    for i, local in enumerate(local_states):
        torch.cat([local[k].detach().reshape(-1).float() for k in keys], out=out[i])
    return out.sub_(flat_global)


def apply_update(global_state: Mapping[str, Tensor], update_vec: Tensor) -> dict[str, Tensor]:
    """New state dict: ``global + update_vec`` on the float entries (cast back to each entry's
    dtype and shape), non-float entries copied from ``global_state``. ``update_vec``: ``(d,)``
    in :func:`flatten_updates`' layout."""
    keys = set(float_keys(global_state))
    expected = update_dim(global_state)
    if update_vec.shape != (expected,):
        raise ValueError(f"update has shape {tuple(update_vec.shape)}, the model has {expected} float elements")
    new, start = {}, 0
    for k, g in global_state.items():
        if k in keys:
            step = update_vec[start : start + g.numel()].reshape(g.shape)
            new[k] = (g.detach().float() + step.float()).to(g.dtype)
            start += g.numel()
        else:
            new[k] = g.detach().clone()
    return new
