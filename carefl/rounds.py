"""The one round loop: broadcast -> collect -> check replies -> aggregate -> checkpoint -> ledger -> evaluate.

The ServerApp (``server_app/app.py``: Flower's send/receive), ``carefl-sim`` (the same
ServerApp on Flower's simulation engine) and the benchmarks (:mod:`carefl.local_transport`,
in-process) all call :func:`run_federation`; they differ only in the :class:`Transport`.

Per round r:

1. build the request (:func:`carefl.request.build_request`: the narrow schema, with the
   server-signed ledger head of the last entry) and send it with the global model;
2. check every training reply as it arrives (:func:`carefl.replies.check_train_reply`; the
   first step, and the only place replies are trusted or not); stop waiting once every listed
   hospital answered with its key, or at ``federation.round_timeout_s``;
3. aggregate (:class:`carefl.federation.Federation`): left-out reasons, robust rule, server
   optimiser, ledger entry with each hospital's signed receipt verbatim;
4. evaluate the new model at the hospitals that trained (replies checked by
   :func:`carefl.replies.check_eval_reply`), checkpoint, log one progress line.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from carefl.config import validate
from carefl.errors import CareFLError, ConfigError
from carefl.federation import Federation, FederationStopped, SecureBucket
from carefl.receipts import SigningKey, sign_head
from carefl.replies import RawReply, RoundContext, TrainReply, check_eval_reply, check_secagg_reply, check_train_reply
from carefl.request import build_request, simulation_section
from carefl.secagg.coordinator import Bucket, plan_buckets
from carefl.secagg.member import MESSAGE_TYPE
from carefl.tasks import HEADLINE, metric_names

log = logging.getLogger("carefl")
TRAIN, EVALUATE = "train", "evaluate"
#: overrides that may accompany ``resume=`` (they do not change what the run computes)
RESUME_KEYS = ("resume", "output_dir", "run_id")
_SECTIONS = ("task", "model", "data", "strategy", "privacy", "federation", "attack", "seed")
SERVER_KEY_FILE = "server_key.pem"


class RunStopped(CareFLError):
    """The operator stopped the run (``flwr stop``): the transport can no longer reach anyone.

    Raised by a :class:`Transport` call; :func:`run_federation` then ends at once with status
    ``stopped``, leaving the ledger open and the last completed round's checkpoint in place, so
    ``resume=<run dir>`` continues from there."""


class Stopper:
    """Ends a running federation as ``stopped`` at any moment, safely: every completed round is
    already checkpointed and ledgered, so this writes ``metrics.json`` (status ``stopped`` and
    how to resume), ``summary.md``, the plots and ``report.html``, and leaves the ledger open and
    the checkpoint in place for ``resume=<run dir>``. Once :meth:`close` ran (the rounds are
    over, or failed), calling it does nothing."""

    def __init__(self, fed: Federation, run_dir: Path) -> None:
        self.fed, self.run_dir, self.open = fed, run_dir, True

    def __call__(self, reason: str) -> None:
        if not self.open:
            return
        self.open = False
        message = f"{reason}; the last completed round's checkpoint is kept: continue with resume={self.run_dir}"
        log.warning("%s", message)
        self.fed.report.finish("stopped", message)
        self.fed.report.write_html({"entries": len(self.fed.ledger), "head": self.fed.ledger.head},
                                   self.fed.config_hash)
        log.info("stopped: metrics %s (the ledger stays open for resume=)", self.run_dir / "metrics.json")

    def close(self) -> None:
        self.open = False


class Transport(Protocol):
    """How the loop reaches hospitals. ``simulated``: the nodes are simulated (Flower's
    simulation engine or in-process), so configured attacks and baselines apply."""

    simulated: bool

    def node_ids(self) -> list[int]:
        """The connected nodes now."""

    def exchange(self, kind: str, node_ids: list[int], request: str, state: dict[str, Tensor],
                 server_round: int, timeout: float) -> Iterator[RawReply]:
        """Send ``(request, state)`` as a ``kind`` message to every node; yield replies as they
        arrive, until all are in or ``timeout`` seconds passed (the consumer may stop early)."""

    def exchange_each(self, kind: str, payloads: Mapping[int, str], request: str, server_round: int,
                      timeout: float) -> Iterator[RawReply]:
        """Send node ``i`` the ``request`` with its own ``payloads[i]`` (JSON text, no weights);
        yield replies as :meth:`exchange` does (secure aggregation's stages)."""


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
        if "personalization" not in cfg:  # a run from before personalization existed
            cfg.personalization = {"name": "none", "epochs": 0}
        if "compression" not in cfg:  # ... or before compression
            cfg.compression = {"name": "none", "block": 256, "fraction": 0.1}
        if "secagg" not in cfg.strategy:  # ... or before secure aggregation
            cfg.strategy.secagg = {"enabled": False, "bucket_size": None, "clip": 10.0, "bits": 22, "threshold": 0.5}
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


def wait_for_nodes(transport: Transport, cfg: DictConfig) -> list[int]:
    """Wait (up to ``federation.round_timeout_s``) until every listed hospital is connected,
    or at least ``federation.min_hospitals`` when the time is up."""
    want, deadline = len(cfg.federation.hospitals), time.monotonic() + cfg.federation.round_timeout_s
    hinted = False
    while True:
        nodes = sorted(transport.node_ids())
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


def _progress(cfg, server_round: int, summary, evals: dict, aggregate: dict, seconds: float, replies) -> str:
    """One line per round; hospitals in ``federation.hospitals`` order, then any others."""
    head = HEADLINE[cfg.task.kind]
    order = {h: i for i, h in enumerate(cfg.federation.hospitals)}

    def ranked(names):
        return sorted(names, key=lambda h: (order.get(h, len(order)), h))

    metric = ", ".join(f"{h} {evals[h][head]:.3f}" for h in ranked(evals))
    eps = {r.hospital: r.metrics["epsilon"] for r in replies if "epsilon" in r.metrics}
    parts = [f"round {server_round}/{cfg.federation.rounds}"]
    if summary.train_loss:  # only without DP: under DP the unnoised loss is never sent
        parts.append("loss: " + " ".join(f"{h} {summary.train_loss[h]:.3f}" for h in ranked(summary.train_loss)))
    parts.append(f"{head} {aggregate.get(head, float('nan')):.3f} ({metric})")
    if eps:
        parts.append("epsilon: " + " ".join(f"{h} {eps[h]:.2f}" for h in ranked(eps)))
    if summary.rejected:
        parts.append("left out: " + ", ".join(ranked(summary.rejected)))
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


def _server_key(cfg: DictConfig) -> SigningKey:
    path = cfg.federation.get("server_key") or Path(str(cfg.output_dir)).expanduser() / SERVER_KEY_FILE
    return SigningKey.load_or_create(Path(str(path)).expanduser())


class Wire(dict):
    """One round's traffic per hospital, from the server's side: ``{hospital: {"bytes_sent":
    B, "bytes_received": B}}`` summed over its messages (train, secure-aggregation stages,
    evaluate), each as Flower counts a message's records; replies nobody could attribute to
    a hospital are not counted."""

    def count(self, name: str | None, raw: RawReply) -> None:
        if name is not None:
            record = self.setdefault(name, {"bytes_sent": 0, "bytes_received": 0})
            record["bytes_sent"] += raw.bytes_sent
            record["bytes_received"] += raw.bytes_received


def _train_phase(transport: Transport, fed: Federation, request: str, nodes: list[int], server_round: int,
                 seen: set[str], wire: Wire) -> tuple[list[TrainReply], dict[int, str]]:
    """Collect and check the training replies; hospitals seen before that did not answer get
    a ``no-reply`` record. Returns (replies, node id -> hospital of the authenticated ones)."""
    cfg = fed.cfg
    hospitals, timeout = list(cfg.federation.hospitals), float(cfg.federation.round_timeout_s)
    ctx = RoundContext(hospitals, fed.run_id, server_round, fed.global_state, fed.model_hash,
                       bool(cfg.privacy.enabled), fed.hospital_keys,
                       secagg_dim=fed.update_dim if cfg.strategy.secagg.enabled else None,
                       compression=None if cfg.compression.name == "none" else
                       (str(cfg.compression.name), int(cfg.compression.block), float(cfg.compression.fraction)))
    replies, names = [], {}
    stream = transport.exchange(TRAIN, nodes, request, fed.global_state, server_round, timeout)
    for raw in stream:
        reply, why = check_train_reply(raw, ctx)
        if reply is None:
            log.warning("round %d: %s", server_round, why)
            continue
        wire.count(reply.hospital, raw)
        replies.append(reply)
        names[raw.node_id] = reply.hospital
        if set(hospitals) <= ctx.answered:
            stream.close()  # the rest went to stale node ids of SuperNodes that registered again
            break
    seen |= ctx.answered
    replies += [TrainReply(h, "no-reply", f"{h}: no reply within federation.round_timeout_s={timeout:g} s "
                           "(crashed, hung or disconnected); it may rejoin in a later round")
                for h in sorted(seen - ctx.answered)]
    return replies, names


def _secagg_phase(transport: Transport, fed: Federation, request: str, replies: list[TrainReply],
                  names: dict[int, str], server_round: int, wire: Wire) -> list[SecureBucket]:
    """Secure aggregation of the round's ok replies: random buckets (``strategy.secagg.
    bucket_size``), then the share, mask and unmask stages, each one message per member
    (:mod:`carefl.secagg`). A member that does not answer a stage has dropped; every reply is
    checked (:func:`carefl.replies.check_secagg_reply`, then the stage's schema) and a bad one
    counts as a dropout, logged. Returns each bucket's outcome."""
    cfg = fed.cfg
    secagg, timeout = cfg.strategy.secagg, float(cfg.federation.round_timeout_s)
    adverts = {r.hospital: r.advert for r in replies if r.status == "ok"}
    node_of = {name: node for node, name in names.items()}
    plan = plan_buckets(sorted(adverts), secagg.bucket_size, seed=int(cfg.seed) * 1_000_003 + server_round)
    buckets = [Bucket(fed.run_id, server_round, {m: adverts[m] for m in members}, fed.update_dim,
                      float(secagg.clip), int(secagg.bits), float(secagg.threshold)) for members in plan]
    owner = {m: bucket for bucket in buckets for m in bucket.members}
    stages = (("share", Bucket.share_requests, Bucket.take_shares), ("mask", Bucket.mask_requests, None),
              ("unmask", Bucket.unmask_requests, Bucket.take_unmask))
    log.info("round %d: secure aggregation in %d bucket(s) of %s hospitals", server_round, len(buckets),
             "/".join(str(len(b.members)) for b in buckets))
    for stage, requests, take in stages:
        payloads = {node_of[m]: json.dumps(p) for bucket in buckets for m, p in requests(bucket).items()}
        answered = 0
        for raw in transport.exchange_each(MESSAGE_TYPE, payloads, request, server_round, timeout):
            name, payload, masked, why = check_secagg_reply(raw, names, fed.update_dim)
            wire.count(name, raw)
            if not why and name not in owner:
                why = f"{name}: a secure-aggregation reply from a hospital in no bucket"
            if not why:
                why = owner[name].take_masked(name, masked) if take is None else take(owner[name], name, payload)
            if why:
                log.warning("round %d: secure aggregation: %s", server_round, why)
            answered += not why
        log.info("round %d: secure aggregation %s stage: %d/%d hospitals answered", server_round, stage, answered,
                 len(payloads))
    return [SecureBucket(b.members, b.u2, *b.result()) for b in buckets]


def _eval_phase(transport: Transport, fed: Federation, request: str, names: dict[int, str], server_round: int,
                wire: Wire) -> dict:
    cfg = fed.cfg
    evals: dict[str, dict] = {}
    for raw in transport.exchange(EVALUATE, sorted(names), request, fed.global_state, server_round,
                                  float(cfg.federation.round_timeout_s)):
        name, result = check_eval_reply(raw, names, metric_names(cfg.task))
        wire.count(name, raw)
        if isinstance(result, str):
            log.warning("round %d: %s", server_round, result)
        elif name not in evals:
            evals[name] = result
    return evals


def _rounds(transport: Transport, fed: Federation, cfg: DictConfig, server_key: SigningKey,
            simulation: dict | None) -> tuple[str, str]:
    """Rounds ``fed.next_round .. federation.rounds``; returns ``(status, message)``:
    ``completed`` or ``stopped`` (the federation cannot go on, :class:`FederationStopped`)."""
    seen: set[str] = set()
    for server_round in range(fed.next_round, cfg.federation.rounds + 1):
        start = time.monotonic()
        nodes = sorted(transport.node_ids())  # hospitals that dropped out may be back
        head = sign_head(server_key, len(fed.ledger) - 1, fed.ledger.head)
        request = build_request(cfg, server_round, fed.run_id, head, simulation)
        wire = Wire()
        replies, names = _train_phase(transport, fed, request, nodes, server_round, seen, wire)
        buckets = (_secagg_phase(transport, fed, request, replies, names, server_round, wire)
                   if cfg.strategy.secagg.enabled else None)
        trained = time.monotonic()
        try:
            summary = fed.aggregate(server_round, replies, buckets)
        except FederationStopped as stop:
            log.warning("%s", stop)
            return "stopped", str(stop)
        aggregated = time.monotonic()
        evals = _eval_phase(transport, fed, request, names, server_round, wire)
        fed.report.add_wire(server_round, wire)
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
    return "completed", ""


def run_federation(transport: Transport, cfg: DictConfig, overrides: Sequence[str] = (),
                   on_start: Callable[[Stopper], None] | None = None) -> Path:
    """Drive all rounds through ``transport``; return the run directory. ``overrides``: the
    ones the user gave (on ``resume=`` only :data:`RESUME_KEYS` may be among them).
    ``on_start(stop)``: called once the run is set up, with the :class:`Stopper` to call if
    the run is stopped from outside while rounds are running (the ServerApp hands it to
    Flower's exit handlers for ``flwr stop``)."""
    from carefl.models import build_model  # the server builds the initial model only here

    run_dir, cfg, resume = prepare_run_dir(cfg, overrides)
    where = str(cfg.output_dir)
    why = ("" if Path(where).expanduser().is_absolute() else
           f" (output_dir={where} is relative: resolved against this ServerApp's working directory {Path.cwd()}; "
           "for `flwr run .` that is where the local SuperLink was started, so give output_dir an absolute path to "
           "choose)")
    log.info("run directory: %s%s", run_dir, why)
    fed = Federation(cfg, run_dir, build_model(cfg).state_dict(), resume=resume, simulated=transport.simulated)
    server_key = _server_key(cfg)
    simulation = simulation_section(cfg, str(run_dir)) if transport.simulated else None
    wait_for_nodes(transport, cfg)
    stop = Stopper(fed, run_dir)
    if on_start is not None:
        on_start(stop)
    try:
        status, message = _rounds(transport, fed, cfg, server_key, simulation)
    except RunStopped as err:
        stop(str(err))
        return run_dir
    finally:
        stop.close()  # from here the run ends by fed.finish (or failed with an error)
    if cfg.federation.baselines and status == "completed":
        if transport.simulated:
            from carefl.baselines import run_baselines

            log.info("baselines: training local-only and pooled models on the same splits ...")
            torch.set_num_threads(int(cfg.federation.torch_threads))
            fed.report.add_baselines(run_baselines(cfg, log, run_dir))
        else:
            log.info("baselines skipped: hospitals' data is not visible to the server in deployment")
    final = fed.finish(status, message)
    log.info("ledger head %s (entry %d), signed by the server key %s", fed.ledger.head, len(fed.ledger) - 1,
             server_key.public_b64)
    log.info("%s: final model %s; metrics %s; plots %s", status, final, run_dir / "metrics.json", run_dir / "plots")
    return run_dir
