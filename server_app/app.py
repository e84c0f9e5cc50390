"""CareFL ServerApp (Flower 1.41 Message API): Flower's send/receive for ``carefl.rounds``.

Run config (``[tool.flwr.app.config]``) carries only ``overrides``: Hydra overrides of
``conf/config.yaml``, e.g. ``flwr run . --stream --run-config "overrides='strategy=median'"``.
Everything else -- the round loop, reply checks, aggregation, ledger -- is in ``carefl/``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping

import httpx
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from carefl import console_logging
from carefl.config import compose_config, split_overrides
from carefl.errors import CareFLError
from carefl.replies import ArrayView, RawReply, message_bytes
from carefl.rounds import RunStopped, log, run_federation

app = ServerApp()

#: the pause between polls for replies doubles from the first to the last value (seconds):
#: every broadcast waits on average half a pause after its last reply arrived, twice a round
#: (Flower's own send_and_receive pauses 3 s in deployment; benchmarks/bench_overhead.py)
POLL_PAUSES_S = (0.005, 0.1)


def _view(array) -> ArrayView:
    """An array of a reply, checked by ``carefl.replies`` before ``numpy()`` deserialises it."""
    return ArrayView(str(array.dtype), tuple(array.shape), len(array.data), lambda: torch.from_numpy(array.numpy()))


def _size(content: RecordDict) -> int:
    """Bytes of a message's records (arrays: their serialised bytes), counted as
    :func:`carefl.replies.message_bytes` does; never raises, whatever a node sent."""
    size = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            size += sum(len(k) + len(a.data) for k, a in record.items())
        else:
            size += message_bytes(dict(record), {})
    return size


def _raw(msg: Message, sent: int) -> RawReply:
    node = msg.metadata.src_node_id
    if msg.has_error():
        return RawReply(node, error=str(msg.error.reason), bytes_sent=sent)
    content = msg.content
    records = {name: dict(content[name]) for name in ("status", "metrics") if name in content}  # not yet trusted
    arrays = {k: _view(a) for k, a in content["arrays"].items()} if "arrays" in content else None
    return RawReply(node, status=records.get("status"), metrics=records.get("metrics"), arrays=arrays,
                    bytes_sent=sent, bytes_received=_size(content))


@contextlib.contextmanager
def _stopped_by_operator():
    """A Runtime API call refused with HTTP 401 is the run being stopped, not a fault. Flower's
    retry handles the first 401 itself (it interrupts the process: :func:`_on_flower_exit`);
    one that still reaches us (a call after that) raises :class:`carefl.rounds.RunStopped`, so
    the round loop ends with status ``stopped`` either way."""
    try:
        yield
    except httpx.HTTPStatusError as err:
        if err.response.status_code == httpx.codes.UNAUTHORIZED:
            raise RunStopped("the run was stopped (flwr stop): the SuperLink no longer answers this ServerApp") from None
        raise


class FlowerTransport:
    """:class:`carefl.rounds.Transport` over a Flower ``Grid``: a SuperLink in deployment, an
    ``InMemoryGrid`` under the simulation engine (how the server knows nodes are simulated)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.simulated = isinstance(grid, InMemoryGrid)

    def node_ids(self) -> list[int]:
        with _stopped_by_operator():
            return list(self.grid.get_node_ids())

    def exchange(self, kind: str, node_ids: list[int], request: str, state: dict[str, torch.Tensor],
                 server_round: int, timeout: float) -> Iterator[RawReply]:
        content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"request": request})})
        messages = [Message(content=content, dst_node_id=nid, message_type=kind, group_id=str(server_round))
                    for nid in node_ids]
        return self._push_pull(kind, messages, server_round, timeout)

    def exchange_each(self, kind: str, payloads: Mapping[int, str], request: str, server_round: int,
                      timeout: float) -> Iterator[RawReply]:
        messages = [Message(content=RecordDict({"config": ConfigRecord({"request": request, "secagg": payload})}),
                            dst_node_id=nid, message_type=kind, group_id=str(server_round))
                    for nid, payload in payloads.items()]
        return self._push_pull(kind, messages, server_round, timeout)

    def _push_pull(self, kind: str, messages: list[Message], server_round: int, timeout: float) -> Iterator[RawReply]:
        with _stopped_by_operator():
            ids = list(self.grid.push_messages(messages))
        sizes = {mid: _size(m.content) for mid, m in zip(ids, messages) if mid}
        pending = set(sizes)
        deadline, pause = time.monotonic() + timeout, POLL_PAUSES_S[0]
        try:
            # The last pull starts at or after the deadline, never before it: one pull can block
            # far past the deadline (Flower stores a reply when its sender starts uploading it, and
            # the ServerApp's object pull then waits until the upload's push session expires,
            # 180 s, when a SuperNode dies mid-upload); the replies other hospitals delivered in
            # time meanwhile are collected by that last pull, not dropped as unanswered.
            while pending:
                last = time.monotonic() >= deadline
                with _stopped_by_operator():
                    pulled = list(self.grid.pull_messages(pending))
                for msg in pulled:
                    pending.discard(msg.metadata.reply_to_message_id)
                    yield _raw(msg, sizes.get(msg.metadata.reply_to_message_id, 0))
                if last or not pending:
                    break
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(2 * pause, POLL_PAUSES_S[1])
        finally:
            if pending:
                log.warning("round %d: %d %s request(s) unanswered (SuperNode gone, too slow, or a stale node id "
                            "of one that registered again); going on without them", server_round, len(pending), kind)


def _on_flower_exit(stop) -> None:
    """``flwr stop`` (Flower 1.41): the SuperLink revokes the ServerApp's token; the next Runtime
    API call gets HTTP 401 and Flower interrupts its own process and runs its exit handlers
    before forcing the exit. This one ends the federation as ``stopped`` (a no-op once the
    rounds are over or failed: :class:`carefl.rounds.Stopper`)."""
    add_exit_handler(lambda: stop("the run was stopped (flwr stop, or the ServerApp was told to exit)"),
                     run_before_force_exit=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the Hydra config from the run config and run the federation."""
    console_logging()
    try:
        overrides = split_overrides(str(context.run_config.get("overrides", "")))
        run_dir = run_federation(FlowerTransport(grid), compose_config(overrides), overrides, on_start=_on_flower_exit)
        outcome = json.loads((run_dir / "metrics.json").read_text())
        if outcome["status"] != "completed":  # Flower would call a federation that stopped early 'completed'
            raise CareFLError(f"the federation ended {outcome['status']}: {outcome['message']}")
    except CareFLError as err:  # one clear line for every edge error
        log.error("%s", err)
        # Re-raised (short traceback) rather than SystemExit: Flower then marks the run
        # finished:failed with this message and uploads the log; SystemExit skipped both, so
        # `flwr ls` showed the run 'running' for a minute and `flwr log` never had the line.
        raise err.with_traceback(None) from None
