"""The server's side of secure aggregation: buckets, routing, and the sum it may learn.

:func:`plan_buckets` cuts the round's hospitals into random buckets; one :class:`Bucket` per
bucket routes the stages of :mod:`carefl.secagg.member` and, at the end, reconstructs what the
protocol lets it: the self-mask seeds ``b`` of the survivors and the mask keys ``s_sk`` of
the dropped members, each from t Shamir shares and each checked against the member's signed
advert (``b_commit`` / ``s_pk``), so bad shares refuse the bucket instead of corrupting it.
Every method that takes a hospital's reply checks it against the stage's schema first (the
edge for these replies) and returns the reason it is refused, or None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from carefl.secagg import crypto
from carefl.secagg.member import b64, context, unb64
from carefl.secagg.quantize import dequantize_mean, sum_problem

#: bytes of one sealed share pair: nonce + a seed share + a key share + GCM tag
SEALED_BYTES = crypto.NONCE_BYTES + crypto.SEED_SHARE_BYTES + crypto.KEY_SHARE_BYTES + 16


def threshold(size: int, fraction: float = 0.5) -> int:
    """Shares needed to reconstruct in a bucket of ``size``: the least t with t > fraction *
    size (``strategy.secagg.threshold``, in [0.5, 1): a majority at least, all at most)."""
    return math.floor(fraction * size) + 1


def plan_buckets(names: list[str], size: int | None, seed: int) -> list[list[str]]:
    """``names`` shuffled (a generator seeded with ``seed``) and cut into ``len // size``
    buckets dealt round-robin, so each has ``size`` or ``size + 1`` members (``size`` None, or
    more than there are names: one bucket of all). Positions in a bucket follow the shuffle."""
    order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()]
    count = buckets_needed(len(order), size)
    return [order[i::count] for i in range(count)]


@dataclass
class Bucket:
    """One bucket's run of the protocol. ``adverts``: member -> its checked advert, in bucket
    order; ``dim``: d of the flattened update; ``bound``/``bits``/``fraction``: ``strategy.secagg``'s
    ``clip``/``bits``/``threshold``."""

    run_id: str
    round: int
    adverts: dict[str, dict]
    dim: int
    bound: float
    bits: int
    fraction: float = 0.5
    sealed: dict[str, dict[str, str]] = field(default_factory=dict)   # sender -> recipient -> ciphertext
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    revealed: dict[str, dict] = field(default_factory=dict)           # responder -> {"b": .., "sk": ..}

    @property
    def members(self) -> list[str]:
        return list(self.adverts)

    @property
    def threshold(self) -> int:
        return threshold(len(self.adverts), self.fraction)

    def _head(self, stage: str) -> dict:
        return {"stage": stage, "run_id": self.run_id, "round": self.round}

    # ---- stage 1 -------------------------------------------------------------------------
    def share_requests(self) -> dict[str, dict]:
        bucket = list(self.adverts.values())
        return {m: {**self._head("share"), "bucket": bucket, "threshold": self.threshold} for m in self.members}

    def take_shares(self, member: str, reply: object) -> str | None:
        peers = set(self.members) - {member}
        shares = reply.get("shares") if isinstance(reply, dict) and set(reply) == {"shares"} else None
        if not isinstance(shares, dict) or set(shares) != peers:
            return f"{member}: its share reply must hold one sealed share pair for each other member"
        if any(unb64(v, SEALED_BYTES) is None for v in shares.values()):
            return f"{member}: a sealed share is not {SEALED_BYTES}-byte base64"
        self.sealed[member] = dict(shares)
        return None

    # ---- stage 2 -------------------------------------------------------------------------
    @property
    def u1(self) -> list[str]:
        return [m for m in self.members if m in self.sealed]

    def mask_requests(self) -> dict[str, dict]:
        u1 = self.u1
        if len(u1) < self.threshold:
            return {}
        return {m: {**self._head("mask"), "shares": {u: self.sealed[u][m] for u in u1 if u != m}} for m in u1}

    def take_masked(self, member: str, masked: Tensor | None) -> str | None:
        if member not in self.u1:
            return f"{member}: a masked input from a member that did not share"
        if masked is None or masked.dtype != torch.int32 or tuple(masked.shape) != (self.dim,):
            return f"{member}: its masked input must be int32 of shape ({self.dim},)"
        self.masked[member] = masked.numpy().view(np.uint32)
        return None

    # ---- stage 3 -------------------------------------------------------------------------
    @property
    def u2(self) -> list[str]:
        return [m for m in self.u1 if m in self.masked]

    def unmask_requests(self) -> dict[str, dict]:
        u2 = self.u2
        if len(u2) < self.threshold:
            return {}
        dropped = [m for m in self.u1 if m not in self.masked]
        return {m: {**self._head("unmask"), "survivors": u2, "dropped": dropped} for m in u2}

    def take_unmask(self, member: str, reply: object) -> str | None:
        u2, dropped = set(self.u2), set(self.u1) - set(self.u2)
        if member not in u2:
            return f"{member}: shares from a member that did not send a masked input"
        ok = (isinstance(reply, dict) and set(reply) == {"b", "sk"} and isinstance(reply["b"], dict)
              and isinstance(reply["sk"], dict) and set(reply["b"]) == u2 and set(reply["sk"]) == dropped
              and all(unb64(v, crypto.SEED_SHARE_BYTES) for v in reply["b"].values())
              and all(unb64(v, crypto.KEY_SHARE_BYTES) for v in reply["sk"].values()))
        if not ok:
            return (f"{member}: its unmask reply must hold a {crypto.SEED_SHARE_BYTES}-byte b share per survivor and a "
                    f"{crypto.KEY_SHARE_BYTES}-byte s_sk share per dropped member")
        self.revealed[member] = reply
        return None

    # ---- the result ------------------------------------------------------------------------
    def _secret(self, owner: str, part: str) -> bytes:
        index = {m: i + 1 for i, m in enumerate(self.members)}
        responders = list(self.revealed)[:self.threshold]
        return crypto.combine({index[r]: unb64(self.revealed[r][part][owner]) for r in responders})

    def result(self) -> tuple[Tensor | None, str]:
        """``(mean update float32 (d,) of U2, "")``, or ``(None, why the bucket failed)``."""
        t, u1, u2 = self.threshold, self.u1, self.u2
        for stage, have in (("shared", len(u1)), ("sent masked inputs", len(u2)), ("sent unmasking shares", len(self.revealed))):
            if have < t:
                return None, f"only {have} of its {len(self.members)} members {stage}, below the threshold t={t}"
        ctx, position = context(self.run_id, self.round), {m: i for i, m in enumerate(self.members)}
        total = np.zeros(self.dim, dtype=np.uint32)
        scratch = np.empty(self.dim + 4, dtype=np.uint32)  # one buffer for every mask
        for m in u2:  # in place: uint32 arithmetic is the ring's, mod 2^32
            total += self.masked[m]
            seed = self._secret(m, "b")
            if crypto.commitment(seed) != self.adverts[m]["b_commit"]:
                return None, f"the shares of {m}'s self-mask do not give the seed it committed to (a member sent bad shares)"
            total -= crypto.mask(seed, self.dim, scratch)
        for v in (m for m in u1 if m not in self.masked):
            s_sk = self._secret(v, "sk")
            if b64(crypto.public_of(s_sk)) != self.adverts[v]["s_pk"]:
                return None, f"the shares of dropped {v}'s mask key do not give the key it advertised (bad shares)"
            for u in u2:  # u added +PRG(k_uv) if it comes before v, -PRG(k_uv) after: take it out
                pair = crypto.mask(crypto.agree(s_sk, unb64(self.adverts[u]["s_pk"]), "mask", ctx), self.dim, scratch)
                if position[u] < position[v]:
                    total -= pair
                else:
                    total += pair
        mean = dequantize_mean(total, len(u2), self.bound, self.bits)
        problem = sum_problem(total, mean, len(u2), self.bound, self.bits)
        return (None, problem) if problem else (mean, "")


def buckets_needed(n: int, size: int | None) -> int:
    """How many buckets :func:`plan_buckets` makes of ``n`` hospitals."""
    return 1 if size is None else max(1, n // size)
