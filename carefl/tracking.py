"""The run's figures in the ecosystem's viewers: TensorBoard event files always, MLflow on request.

Both views get the same scalars as ``metrics.json`` (one per figure and round, step = round
number), written after each round's checkpoint, so a viewer follows a running federation live:

=================================  ===================================================
tag                                value
=================================  ===================================================
``aggregate/<metric>``             the example-weighted test metric over hospitals
``eval/<metric>/<hospital>``       each hospital's test metric of the global model
``privacy/epsilon/<hospital>``     epsilon each hospital reports spent so far
``train/loss/<hospital>``          training loss (only without DP: under DP it is not sent)
``robust/norm/<row>``              update norm of each row the rule saw (a hospital, or a secure bucket)
``wire/bytes_received/<hospital>`` bytes the server received from the hospital in the round
``time/round_seconds``             the round's wall time at the server
=================================  ===================================================

- **TensorBoard** (the ``tensorboard`` package, a dependency): ``<run_dir>/tensorboard/``;
  ``tensorboard --logdir outputs`` shows every run.
- **MLflow** (``tracking=mlflow``, conf/tracking/mlflow.yaml; the optional ``mlflow-skinny``
  package, ``pip install -e ".[mlflow]"``): one MLflow run per CareFL run, named by its run id
  and tagged ``carefl.run_id``/``carefl.run_dir`` (a resumed run continues the same MLflow
  run), in experiment ``tracking.experiment``. Params: the composed config, flattened
  (``federation.rounds``, ...). At the end: the MLflow run's status (``FINISHED`` for
  ``completed``, ``KILLED`` for ``stopped``, else ``FAILED``) and the artifacts
  ``metrics.json``, ``summary.md``, ``report.html`` and ``plots/``. Where it goes:
  ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``
  (a SQLite store keeps artifacts in ``mlflow-artifacts/`` beside its file; ``mlflow ui --backend-store-uri
  sqlite:///outputs/mlflow.db`` shows them).

Both are views: ``metrics.json`` stays the record (its hash is in the ledger; the views' are
not). A tracking store that fails (an MLflow server down, a full disk) costs a warning and that
view, never the federation. What MLflow receives is what the coordinator already holds
(aggregate figures and its own config), never a hospital's data; a remote ``tracking.uri`` is
a place the consortium chose to send that to.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("carefl.server")

#: MLflow's limits (3.x): a batch carries at most 1000 metrics and 100 params; a param value 6000 chars
_METRICS_PER_BATCH, _PARAMS_PER_BATCH, _PARAM_CHARS = 1000, 100, 500
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "KILLED"}  # anything else: FAILED


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def round_scalars(record: dict, metric_names: tuple[str, ...]) -> dict[str, float]:
    """``{tag: value}`` of one ``metrics.json`` round record (finite values only)."""
    scalars = {f"aggregate/{m}": record["aggregate"].get(m) for m in metric_names}
    for hospital, metrics in record.get("eval", {}).items():
        scalars.update({f"eval/{m}/{hospital}": metrics.get(m) for m in metric_names})
    for hospital, train in record.get("train", {}).items():
        scalars[f"privacy/epsilon/{hospital}"] = train.get("epsilon")
        scalars[f"train/loss/{hospital}"] = train.get("train_loss")
    for row, signals in record.get("robust", {}).items():
        scalars[f"robust/norm/{row}"] = signals.get("norm")
    for hospital, traffic in record.get("wire", {}).items():
        scalars[f"wire/bytes_received/{hospital}"] = traffic.get("bytes_received")
    scalars["time/round_seconds"] = record.get("timing", {}).get("round_seconds")
    return {tag: float(v) for tag, v in scalars.items() if _finite(v)}


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"federation.rounds": "6", ...}`` (values cut to 500 chars)."""
    params = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, name + "."))
        else:
            params[name] = str(value)[:_PARAM_CHARS]
    return params


def shown_uri(uri: str) -> str:
    """``uri`` as the logs show it: a password in it (``https://user:secret@host``) is replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                            + (f":{parts.port}" if parts.port else "")))


def mlflow_uri(uri: str | None, output_root: Path) -> str:
    """Where MLflow writes: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    file beside the run directories."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_root) / 'mlflow.db').resolve()}"


class MlflowView:
    """One MLflow run for one CareFL run, through ``mlflow.MlflowClient`` (no global state, so
    in-process sweeps do not mix runs). Opened at the first write; a resumed run reopens the
    MLflow run tagged with its run directory."""

    def __init__(self, run_dir: Path, uri: str | None, experiment: str, params: dict[str, str]) -> None:
        self.run_dir, self.experiment, self.params = Path(run_dir).resolve(), experiment, params
        self.uri = mlflow_uri(uri, self.run_dir.parent)
        self.client, self.run_id = None, None

    def _open(self) -> None:
        if self.client is not None:
            return
        for name in ("mlflow", "alembic"):  # their INFO lines (creating tables, ...) say nothing to an operator
            logging.getLogger(name).setLevel(logging.WARNING)
        # A view must not hold up the federation: MLflow's own defaults retry an unreachable server
        # for about 4 minutes (7 retries, backoff 2 s, timeout 120 s). An operator's setting wins.
        for variable, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(variable, value)
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = None  # a tracking server keeps its own; a SQLite file gets a folder beside it, not ./mlruns
            if self.uri.startswith("sqlite:///"):
                artifacts = (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlflow-artifacts").as_uri()
            experiment_id = client.create_experiment(self.experiment, artifact_location=artifacts)
        mine = client.search_runs([experiment_id], filter_string=f"tags.`carefl.run_dir` = '{self.run_dir}'",
                                  max_results=1)
        if mine:  # a resumed run: continue its MLflow run
            self.run_id = mine[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=self.run_dir.name,
                                    tags={"carefl.run_id": self.run_dir.name, "carefl.run_dir": str(self.run_dir)})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in self.params.items()]
            for i in range(0, len(params), _PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=params[i:i + _PARAMS_PER_BATCH])
        self.client = client
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.experiment, shown_uri(self.uri))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._open()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in scalars.items()]
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _METRICS_PER_BATCH])

    def end(self, status: str, files: list[Path]) -> None:
        self._open()
        for path in files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(status, "FAILED"))


class Tracker:
    """Writes each completed round once to TensorBoard (and MLflow when configured); the views
    open at the first round they write. ``mlflow``: an :class:`MlflowView`, or None."""

    def __init__(self, run_dir: Path, metric_names: tuple[str, ...], mlflow: MlflowView | None = None) -> None:
        self.directory, self.metric_names, self.mlflow = Path(run_dir) / "tensorboard", metric_names, mlflow
        self.written: set[int] = set()
        self._writer = None

    def _mlflow(self, action: str, *args) -> None:
        """Run one MLflow call; a failing store costs a warning and the view, not the run."""
        if self.mlflow is None:
            return
        try:
            getattr(self.mlflow, action)(*args)
        except Exception as err:  # noqa: BLE001 - any store error (network, disk, schema) ends the view only
            first = str(err).splitlines()[0] if str(err) else ""
            log.warning("MLflow tracking at %s stopped (%s: %s); the run goes on, metrics.json stays the record",
                        shown_uri(self.mlflow.uri), type(err).__name__, first.replace(self.mlflow.uri, shown_uri(self.mlflow.uri)))
            self.mlflow = None

    def log_rounds(self, rounds: list[dict]) -> None:
        """Write the rounds not written yet (a resumed run marks its earlier ones written)."""
        for record in rounds:
            if record["round"] in self.written or "timing" not in record:  # only completed rounds
                continue
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

                self._writer = SummaryWriter(str(self.directory))
            scalars = round_scalars(record, self.metric_names)
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=record["round"])
            self._mlflow("log", record["round"], scalars)
            self.written.add(record["round"])
        if self._writer is not None:
            self._writer.flush()

    def close(self, status: str | None = None, files: list[Path] = ()) -> None:
        """Close the event file; with ``status`` (the run ended) also end the MLflow run,
        attaching ``files`` as its artifacts."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if status is not None:
            self._mlflow("end", status, list(files))
