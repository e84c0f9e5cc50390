"""In-process transport: the round loop talks to simulated hospitals by function call.

Used by the benchmarks (many federations on 2 cores cannot afford Ray workers) and by tests
that play a hostile hospital. Every request and reply crosses the same edges as under Flower:
the request JSON through :func:`carefl.hospital.handle` (schema, site policy, receipt) and the
reply through :func:`carefl.replies.check_train_reply`. Node ``i + 1`` is the simulated
SuperNode of partition ``i`` (node config ``partition-id``/``num-partitions``, as Flower's
simulation engine sets it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from torch import Tensor

from carefl.hospital import HospitalReply, handle
from carefl.replies import ArrayView, RawReply, dtype_name, message_bytes


def raw_reply(node_id: int, reply: HospitalReply, bytes_sent: int = 0) -> RawReply:
    """What the server would receive for ``reply`` (the ClientApp's three records); ``bytes_sent``:
    the size of the message it answers."""
    status = reply.status_record()
    arrays = None
    if reply.state is not None:
        arrays = {k: ArrayView(dtype_name(v), tuple(v.shape), v.numel() * v.element_size(), lambda v=v: v.clone())
                  for k, v in reply.state.items()}
    size = message_bytes({**status, **reply.metrics}, reply.state or {})
    return RawReply(node_id, status=status, metrics=dict(reply.metrics), arrays=arrays, bytes_sent=bytes_sent,
                    bytes_received=size)


class LocalTransport:
    """``n`` simulated hospitals in this process. ``tamper(node_id, kind, raw) -> raw`` (tests)
    may replace what a node sends, to play a hostile hospital."""

    simulated = True

    def __init__(self, n: int, tamper: Callable[[int, str, RawReply], RawReply] | None = None) -> None:
        self.n, self.tamper = n, tamper

    def node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))

    def exchange(self, kind: str, node_ids: list[int], request: str, state: dict[str, Tensor],
                 server_round: int, timeout: float) -> Iterator[RawReply]:
        for node in node_ids:
            yield self._send(node, kind, request, state, None)

    def exchange_each(self, kind: str, payloads: Mapping[int, str], request: str, server_round: int,
                      timeout: float) -> Iterator[RawReply]:
        for node, payload in payloads.items():
            yield self._send(node, kind, request, {}, payload)

    def _send(self, node: int, kind: str, request: str, state: dict[str, Tensor], payload: str | None) -> RawReply:
        reply = handle(kind, request, state, {"partition-id": node - 1, "num-partitions": self.n}, payload)
        raw = raw_reply(node, reply, message_bytes({"request": request, **({"secagg": payload} if payload else {})}, state))
        return self.tamper(node, kind, raw) if self.tamper else raw
