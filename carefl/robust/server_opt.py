"""Server optimisers: turn the aggregated update into the step added to the global model.

``opt.step(update (d,)) -> step (d,)``; the server then calls
``apply_update(global_state, step)``. ``update`` is a pseudo-gradient *descent direction*
(aggregate of local - global), so the step is added, not subtracted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from carefl.robust.base import Stateless
from carefl.robust.config import instantiate, resolve


class ServerSGD(Stateless):
    """``step = lr * update``. lr=1 is plain FedAvg (the global model becomes the aggregate)."""

    def __init__(self, lr: float = 1.0):
        self.lr = lr

    def step(self, update: Tensor) -> Tensor:
        return self.lr * update


class FedAvgM(Stateless):
    """FedAvgM (Hsu et al. 2019): ``m <- momentum * m + update``, ``step = lr * m``, ``m_0 = 0``
    (so the first step is ``lr * update``, as Flower's FedAvgM). State: ``{"m": Tensor (d,)}``."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        self.lr, self.momentum = lr, momentum
        self.m: Tensor | None = None

    def step(self, update: Tensor) -> Tensor:
        self.m = update.clone() if self.m is None else self.momentum * self.m + update
        return self.lr * self.m

    def state_dict(self) -> dict:
        return {} if self.m is None else {"m": self.m.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.m = state["m"].clone() if "m" in state else None


class FedAdam(Stateless):
    """FedAdam, Reddi et al. 2021 (Adaptive Federated Optimization, Algorithm 2; no bias
    correction, unlike Flower's FedAdam):
    ``m <- beta1 m + (1 - beta1) u``, ``v <- beta2 v + (1 - beta2) u^2``,
    ``step = lr * m / (sqrt(v) + tau)``, with ``m_0 = v_0 = 0``. tau: adaptivity (same unit as
    the updates). State: ``{"m": Tensor (d,), "v": Tensor (d,)}``."""

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def step(self, update: Tensor) -> Tensor:
        if self.m is None:
            self.m, self.v = torch.zeros_like(update), torch.zeros_like(update)
        self.m = self.beta1 * self.m + (1 - self.beta1) * update
        self.v = self.beta2 * self.v + (1 - self.beta2) * update.square()
        return self.lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict:
        return {} if self.m is None else {"m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.m = state["m"].clone() if "m" in state else None
        self.v = state["v"].clone() if "v" in state else None


SERVER_OPTS: dict[str, type] = {"sgd": ServerSGD, "fedavgm": FedAvgM, "fedadam": FedAdam}


def build_server_optimizer(strategy_cfg: Mapping) -> ServerSGD | FedAvgM | FedAdam:
    """The optimiser named by ``strategy.server_opt`` (``{name: sgd|fedavgm|fedadam, ...}``)."""
    cls, params = resolve(SERVER_OPTS, strategy_cfg["server_opt"], "strategy.server_opt")
    return instantiate(cls, params, f=0)
