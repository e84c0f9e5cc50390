"""CareFL ServerApp (Flower 1.41 Message API): Flower messages <-> ``carefl.federation``.

Run config (``[tool.flwr.app.config]``) carries only ``overrides``: Hydra overrides of
``conf/config.yaml``, e.g. ``flwr run . --stream --run-config "overrides='strategy=median'"``.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from carefl.baselines import run_baselines
from carefl.config import compose_config, to_json, validate
from carefl.errors import CareFLError, ConfigError
from carefl.federation import Federation, FederationStopped
from carefl.hospital import TrainReply
from carefl.models import build_model
from carefl.tasks import HEADLINE

log = logging.getLogger("carefl")
app = ServerApp()

#: the pause between polls for replies doubles from the first to the last value (seconds):
#: every broadcast waits on average half a pause after its last reply arrived, twice a round
#: (Flower's own send_and_receive pauses 3 s in deployment; benchmarks/bench_overhead.py)
POLL_PAUSES_S = (0.005, 0.1)


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s carefl %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the Hydra config from the run config and run the federation."""
    _setup_logging()
    try:
        overrides = shlex.split(str(context.run_config.get("overrides", "")))
        cfg = compose_config(overrides)
        run_federation(grid, cfg, overrides)
    except CareFLError as err:  # one clear line for every edge error
        log.error("%s", err)
        # Re-raised (short traceback) rather than SystemExit: Flower then marks the run
        # finished:failed with this message and uploads the log; SystemExit skipped both, so
        # `flwr ls` showed the run 'running' for a minute and `flwr log` never had the line.
        raise err.with_traceback(None) from None


#: overrides that may accompany ``resume=`` (they do not change what the run computes)
RESUME_KEYS = ("resume", "output_dir", "run_id")
_SECTIONS = ("task", "model", "data", "strategy", "privacy", "federation", "attack", "seed")


def _override_key(override: str) -> str:
    """``federation.rounds`` of ``federation.rounds=3`` (also ``+key=v``, ``~key``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _saved_config(run_dir: Path, given: str) -> DictConfig:
    """The run's own ``config.yaml``, checked before anything in ``run_dir`` is touched."""
    saved = run_dir / "config.yaml"
    fix = "point resume= at a CareFL run directory (outputs/<run-id>)"
    if not saved.is_file():
        raise ConfigError(f"resume={given}: {saved} not found; {fix}")
    try:
        cfg = OmegaConf.load(saved)
        missing = [k for k in _SECTIONS if k not in cfg]
        if missing:
            raise ConfigError(f"it lacks {missing}, so it is not a CareFL run's config")
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"resume={given}: {saved}: {err}; {fix}") from None
    except Exception as err:  # YAML / OmegaConf errors of a corrupt file: all "unreadable"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"resume={given}: {saved} is unreadable ({first}); {fix}") from None
    return cfg


def prepare_run_dir(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[Path, DictConfig, bool]:
    """Create ``<output_dir>/<run_id>/`` (never overwriting) or reopen it for ``resume=``.

    On resume the run's own ``config.yaml`` is the config (so the ledger's config hash holds
    and the DP noise stays calibrated for the planned rounds): ``overrides`` other than
    :data:`RESUME_KEYS` are refused, ``federation.rounds`` included.
    """
    if cfg.resume:
        changed = [o for o in overrides if _override_key(o) not in RESUME_KEYS]
        if changed:
            raise ConfigError(
                f"resume={cfg.resume} continues the run with its own config.yaml, so {' '.join(changed)} "
                "cannot apply (a run's settings, federation.rounds included, are fixed when it starts); "
                "drop them, or start a new run"
            )
        run_dir = Path(str(cfg.resume)).expanduser().resolve()
        return run_dir, _saved_config(run_dir, str(cfg.resume)), True
    run_id = cfg.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir = (Path(str(cfg.output_dir)).expanduser() / str(run_id)).resolve()
    if run_dir.exists():
        raise ConfigError(f"run directory {run_dir} already exists; choose another run_id= or resume={run_dir}")
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir, cfg, False


def _wait_for_nodes(grid: Grid, cfg: DictConfig) -> list[int]:
    """Wait (up to ``federation.round_timeout_s``) until every listed hospital is connected,
    or at least ``federation.min_hospitals`` when the time is up."""
    want, deadline = len(cfg.federation.hospitals), time.monotonic() + cfg.federation.round_timeout_s
    hinted = False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or (time.monotonic() > deadline and len(nodes) >= cfg.federation.min_hospitals):
            return nodes
        if time.monotonic() > deadline:
            raise CareFLError(
                f"only {len(nodes)} SuperNode(s) connected after {cfg.federation.round_timeout_s:.0f} s; "
                f"federation.min_hospitals={cfg.federation.min_hospitals}"
            )
        if not hinted:
            log.warning(
                "federation.hospitals lists %d hospitals and %d SuperNode(s) are connected; waiting up to "
                "federation.round_timeout_s=%.0f s for the rest. In simulation start one SuperNode per "
                "hospital: flwr run . --federation-config \"num-supernodes=%d\"",
                want, len(nodes), cfg.federation.round_timeout_s, want,
            )
            hinted = True
        log.info("waiting for hospitals: %d/%d SuperNodes connected", len(nodes), want)
        time.sleep(2.0)


def _content(state: dict[str, torch.Tensor], cfg_json: str, server_round: int, run_dir: Path) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord(state),
        "config": ConfigRecord({"cfg": cfg_json, "round": server_round, "run-dir": str(run_dir)}),
    })


def _broadcast(grid: Grid, nodes: list[int], kind: str, content: RecordDict, server_round: int, timeout: float,
               hospitals: list[str]) -> list[Message]:
    """Send ``content`` to ``nodes`` and collect the replies until all are in, every hospital
    in ``hospitals`` has answered (what is left went to the stale node id of a SuperNode that
    restarted and registered again), or ``timeout`` s passed (a dead SuperNode never answers)."""
    messages = [Message(content=content, dst_node_id=nid, message_type=kind, group_id=str(server_round)) for nid in nodes]
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    answered: set[str] = set()
    deadline, pause = time.monotonic() + timeout, POLL_PAUSES_S[0]
    while pending and not set(hospitals) <= answered and time.monotonic() < deadline:
        for msg in grid.pull_messages(pending):
            pending.discard(msg.metadata.reply_to_message_id)
            replies.append(msg)
            if not msg.has_error():
                answered.add(str(msg.content["status"]["hospital"]))
        if pending and not set(hospitals) <= answered:
            time.sleep(pause)
            pause = min(2 * pause, POLL_PAUSES_S[1])
    if pending:
        log.warning("round %d: %d %s request(s) unanswered (SuperNode gone or too slow); going on without them",
                    server_round, len(pending), kind)
    return replies


def _train_replies(replies, names: dict[int, str]) -> list[TrainReply]:
    out = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            who = names.get(node, f"node {node}")
            log.warning("%s failed this round: %s", who, msg.error.reason)
            continue
        status = msg.content["status"]
        names[node] = str(status["hospital"])
        state = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else None
        out.append(TrainReply(names[node], str(status["status"]), str(status["reason"]), state,
                              dict(msg.content["metrics"])))
    return out


def _progress(cfg, server_round: int, summary, evals: dict, aggregate: dict, seconds: float, replies) -> str:
    """One line per round; hospitals in ``federation.hospitals`` order, then any others."""
    head = HEADLINE[cfg.task.kind]
    order = {h: i for i, h in enumerate(cfg.federation.hospitals)}

    def ranked(names):
        return sorted(names, key=lambda h: (order.get(h, len(order)), h))

    loss = " ".join(f"{h} {summary.train_loss[h]:.3f}" for h in ranked(summary.train_loss))
    metric = ", ".join(f"{h} {evals[h][head]:.3f}" for h in ranked(evals))
    eps = {r.hospital: r.metrics["epsilon"] for r in replies if "epsilon" in r.metrics}
    parts = [f"round {server_round}/{cfg.federation.rounds}", f"loss: {loss}",
             f"{head} {aggregate.get(head, float('nan')):.3f} ({metric})"]
    if eps:
        parts.append("epsilon: " + " ".join(f"{h} {eps[h]:.2f}" for h in ranked(eps)))
    if summary.rejected:
        parts.append("left out: " + ", ".join(ranked(summary.rejected)))
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


def run_federation(grid: Grid, cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Drive all rounds; return the run directory. ``overrides``: the ones the user gave
    (on ``resume=`` only :data:`RESUME_KEYS` may be among them)."""
    run_dir, cfg, resume = prepare_run_dir(cfg, overrides)
    log.info("run directory: %s", run_dir)
    fed = Federation(cfg, run_dir, build_model(cfg).state_dict(), resume=resume)
    cfg_json, timeout, hospitals = to_json(cfg), float(cfg.federation.round_timeout_s), list(cfg.federation.hospitals)
    nodes = _wait_for_nodes(grid, cfg)
    names: dict[int, str] = {}
    simulated = True
    status, message = "completed", ""
    for server_round in range(fed.next_round, cfg.federation.rounds + 1):
        start = time.monotonic()
        nodes = sorted(grid.get_node_ids())  # hospitals that dropped out may be back
        content = _content(fed.global_state, cfg_json, server_round, run_dir)
        train_msgs = _broadcast(grid, nodes, MessageType.TRAIN, content, server_round, timeout, hospitals)
        replies = _train_replies(train_msgs, names)
        replied = {r.hospital for r in replies}
        replies += [TrainReply(h, "no-reply", f"{h}: no reply within federation.round_timeout_s={timeout:g} s "
                               "(crashed, hung or disconnected); it may rejoin in a later round", None, {})
                    for h in sorted(set(names.values()) - replied)]
        nodes = [m.metadata.src_node_id for m in train_msgs if not m.has_error()]  # evaluate where training answered
        trained = time.monotonic()
        simulated = simulated and all(r.metrics.get("simulated", 0.0) for r in replies)
        try:
            summary = fed.aggregate(server_round, replies)
        except FederationStopped as stop:
            log.warning("%s", stop)
            status, message = "stopped", str(stop)
            break
        aggregated = time.monotonic()
        content = _content(fed.global_state, cfg_json, server_round, run_dir)
        evals = {}
        for msg in _broadcast(grid, nodes, MessageType.EVALUATE, content, server_round, timeout, hospitals):
            if msg.has_error():
                log.warning("evaluation failed at %s: %s", names.get(msg.metadata.src_node_id, "a node"), msg.error.reason)
                continue
            evals[str(msg.content["status"]["hospital"])] = dict(msg.content["metrics"])
        evaluated = time.monotonic()
        aggregate = fed.record_evaluation(server_round, evals)
        fed.checkpoint(server_round)
        end = time.monotonic()
        fed.report.add_timing(server_round, {
            "train_phase_seconds": trained - start, "aggregate_seconds": aggregated - trained,
            "eval_phase_seconds": evaluated - aggregated, "checkpoint_seconds": end - evaluated,
            "round_seconds": end - start,
        })
        log.info("%s", _progress(cfg, server_round, summary, evals, aggregate, end - start, replies))
    if cfg.federation.baselines and status == "completed":
        if simulated:
            log.info("baselines: training local-only and pooled models on the same splits ...")
            torch.set_num_threads(int(cfg.federation.torch_threads))
            fed.report.add_baselines(run_baselines(cfg, log))
        else:
            log.info("baselines skipped: hospitals' data is not visible to the server in deployment")
    final = fed.finish(status, message)
    log.info("%s: final model %s; metrics %s; plots %s", status, final, run_dir / "metrics.json", run_dir / "plots")
    return run_dir
