"""Reject malformed hospital updates before they reach the aggregation maths."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def validate_update(hospital: str, local_state: Mapping[str, Tensor], global_state: Mapping[str, Tensor]) -> str | None:
    """``None`` if ``local_state`` can be aggregated against ``global_state``, else one line
    naming the hospital and the problem: missing / extra keys, a value that is not a tensor,
    wrong shape or dtype, NaN/Inf, or finite values whose update norm ``||local - global||_2``
    overflows float. Norm bounds relative to the round are :func:`norm_outliers`' job."""
    missing = sorted(set(global_state) - set(local_state))
    extra = sorted(set(local_state) - set(global_state))
    if missing or extra:
        return f"hospital {hospital}: state dict keys differ from the global model (missing {missing[:5]}, extra {extra[:5]})"
    sq_norm = 0.0
    for k, g in global_state.items():
        v = local_state[k]
        if not isinstance(v, Tensor):
            return f"hospital {hospital}: {k} is a {type(v).__name__}, not a tensor"
        if v.shape != g.shape:
            return f"hospital {hospital}: {k} has shape {tuple(v.shape)}, expected {tuple(g.shape)}"
        if v.dtype != g.dtype:
            return f"hospital {hospital}: {k} has dtype {v.dtype}, expected {g.dtype}"
        if torch.is_floating_point(v):
            dist = torch.dist(v, g).item()  # one fused pass, no temporaries (6x the double copies)
            # a non-finite dist means NaN/Inf in v, or finite values whose norm overflows; only
            # the first needs the full isfinite scan
            if not math.isfinite(dist) and not torch.isfinite(v).all():
                return f"hospital {hospital}: {k} contains NaN or Inf"
            sq_norm += dist * dist
    if not math.isfinite(sq_norm):
        return f"hospital {hospital}: update norm {sq_norm**0.5:.4g} overflows float: an absurd update"
    return None


def norm_outliers(updates: Tensor, max_norm: float | None, max_ratio: float | None) -> dict[int, str]:
    """Rows of ``updates`` (float32 ``(n, d)``, one per hospital) whose L2 norm is absurd, with
    the reason: above ``max_norm`` (``federation.max_update_norm``, weights' units; None = no
    bound) or above ``max_ratio`` times the median row norm (``federation.max_update_norm_ratio``;
    None = no bound). With at most f < n/2 Byzantine rows the median is bracketed by honest
    norms, so no attacker can raise the bound beyond ``max_ratio`` x an honest norm; a
    scaled-up update is dropped whatever the rule behind it."""
    if updates.shape[0] == 0:
        return {}
    norms = torch.linalg.vector_norm(updates, dim=1).tolist()
    median = float(torch.tensor(norms).median()) if max_ratio is not None else math.inf
    out = {}
    for i, norm in enumerate(norms):
        if max_norm is not None and not norm <= max_norm:
            out[i] = f"update norm {norm:.4g} exceeds federation.max_update_norm={max_norm:.4g}"
        elif max_ratio is not None and not norm <= max_ratio * median:
            out[i] = (f"update norm {norm:.4g} exceeds federation.max_update_norm_ratio={max_ratio:g} x the round's "
                      f"median norm {median:.4g}")
    return out
