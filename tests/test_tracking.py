"""TensorBoard event files (carefl/tracking.py) from a real federation (in-process transport)."""

from __future__ import annotations

import json

from carefl.config import compose_config
from carefl.local_transport import LocalTransport
from carefl.rounds import run_federation
from conftest import TINY


def test_a_run_writes_tensorboard_scalars_that_match_its_metrics(tmp_path):
    """report.html's figures in the ecosystem's viewer: the event files under <run>/tensorboard
    hold, per round, the same aggregate and per-hospital values as metrics.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_config([*TINY.split(), "federation.rounds=2", f"output_dir={tmp_path}"])
    run_dir = run_federation(LocalTransport(3), cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"aggregate/dice", "eval/dice/st-mary", "privacy/epsilon/riverside", "wire/bytes_received/northfield",
            "time/round_seconds", "robust/norm/st-mary"} <= tags
    for tag, path in (("aggregate/dice", ("aggregate", "dice")), ("eval/dice/st-mary", ("eval", "st-mary", "dice"))):
        assert_logged([(e.step, e.value) for e in events.Scalars(tag)], metrics, path, rounds=[1, 2])


def assert_logged(logged: list[tuple[int, float]], metrics: dict, path: tuple[str, ...], rounds: list[int]) -> None:
    """``logged`` (step, value) pairs are metrics.json's value at ``path`` in each round, once per round."""
    expected = []
    for record in metrics["rounds"]:
        value = record
        for key in path:
            value = value[key]
        expected.append((record["round"], value))
    assert [s for s, _ in logged] == rounds
    assert all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(logged, expected))


def test_local_training_prints_progress_with_what_is_left(caplog):
    """A hospital's console shows periodic lines with steps done and an estimate of the rest."""
    import logging

    import torch
    from torch.utils.data import TensorDataset

    from carefl.training import Progress, make_loader, make_optimizer, train_epochs

    compose = compose_config(["data.image_size=16", "model.channels=[4,8,16]"])
    from carefl.models import build_model

    model = build_model(compose)
    data = TensorDataset(torch.randn(40, 1, 16, 16), torch.randint(0, 2, (40, 1, 16, 16)).float())
    progress = Progress(logging.getLogger("carefl.hospital"), "hospital h training", total=10, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="carefl.hospital"):
        result = train_epochs(model, make_optimizer(model, "adam", 0.01), make_loader(data, 8, seed=0),
                              compose.task, 2, progress=progress)
    lines = [r.getMessage() for r in caplog.records if "hospital h training" in r.getMessage()]
    assert result.steps == 10 and len(lines) == 10
    assert lines[0].startswith("hospital h training: step 1/10 (10%)") and "s left" in lines[0]
    assert lines[-1].startswith("hospital h training: step 10/10 (100%)") and "~0 s left" in lines[-1]


def _mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_tracking_mlflow_logs_the_run_and_a_resumed_run_continues_it(tmp_path):
    """tracking=mlflow: one MLflow run per CareFL run in a real SQLite store (MLflow's own client
    reads it back): the config as params, each round's scalars equal to metrics.json, the end
    status and the report files as artifacts. A run stopped in round 2 and resumed continues the
    same MLflow run, each round logged once, and ends FINISHED."""
    from mlflow import MlflowClient

    from carefl.rounds import RunStopped

    class StoppedInRound2(LocalTransport):
        def exchange(self, kind, node_ids, request, state, server_round, timeout):
            if (server_round, kind) == (2, "train"):
                raise RunStopped("the run was stopped (flwr stop)")
            yield from super().exchange(kind, node_ids, request, state, server_round, timeout)

    overrides = [*TINY.split(), "federation.rounds=3", "privacy=none", "tracking=mlflow", f"output_dir={tmp_path}",
                 "run_id=r"]
    run_dir = run_federation(StoppedInRound2(3), compose_config(overrides))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("carefl")
    (stopped,) = client.search_runs([experiment.experiment_id])
    assert stopped.info.status == "KILLED" and stopped.info.run_name == "r"
    assert stopped.data.params["federation.rounds"] == "3" and stopped.data.params["tracking.name"] == "mlflow"
    assert _mlflow_history(uri, stopped.info.run_id, "aggregate/dice") != []

    resume = [f"resume={run_dir}", f"output_dir={tmp_path}"]
    run_federation(LocalTransport(3), compose_config(resume), resume)
    (run,) = client.search_runs([experiment.experiment_id])  # the same MLflow run, not a second one
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key, path in (("aggregate/dice", ("aggregate", "dice")), ("eval/dice/riverside", ("eval", "riverside", "dice"))):
        # each round once, across the stop and the resume
        assert_logged(_mlflow_history(uri, run.info.run_id, key), metrics, path, rounds=[1, 2, 3])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "summary.md", "report.html", "plots"} <= artifacts
    local = tmp_path / "mlflow-artifacts"  # beside the SQLite file, not in the working directory's ./mlruns
    assert run.info.artifact_uri.startswith(local.as_uri()) and (local / run.info.run_id / "artifacts" / "report.html").is_file()


def test_an_mlflow_store_that_fails_costs_a_warning_not_the_run(tmp_path, caplog):
    """A tracking server that cannot be reached: the federation completes, its record is
    intact, and the log says once why the MLflow view stopped."""
    import logging

    from conftest import free_ports

    logging.getLogger("carefl").propagate = True
    (port,) = free_ports(1)  # nothing listens there
    cfg = compose_config([*TINY.split(), "federation.rounds=1", "privacy=none", "tracking=mlflow",
                          f"tracking.uri=http://127.0.0.1:{port}", f"output_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="carefl"):
        run_dir = run_federation(LocalTransport(3), cfg)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking at" in r.getMessage()]
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0] and "metrics.json stays the record" in warnings[0]


def test_tracking_mlflow_without_mlflow_installed_is_one_line_with_the_fix(monkeypatch):
    import importlib.util

    import pytest

    from carefl.config import validate
    from carefl.errors import ConfigError

    cfg = compose_config(["tracking=mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r'tracking=mlflow needs MLflow.*pip install -e "\.\[mlflow\]"'):
        validate(cfg)


def test_baselines_print_progress_with_what_is_left(caplog):
    """The baselines (about as long as the federation) print the same periodic lines as a
    hospital's training, one series per baseline, ending at 100%."""
    import logging

    from carefl.baselines import run_baselines

    cfg = compose_config([*TINY.split(), "federation.rounds=1", "privacy=none"])
    logging.getLogger("carefl").propagate = True  # console_logging turns it off for its own handler
    log = logging.getLogger("carefl.server")
    with caplog.at_level(logging.INFO, logger="carefl.server"):
        run_baselines(cfg, log)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("baseline ") and "step" in r.getMessage()]
    for what in ("local-only st-mary", "local-only riverside", "local-only northfield", "pooled"):
        mine = [line for line in lines if line.startswith(f"baseline {what}:")]
        assert mine and "(100%)" in mine[-1] and "~0 s left" in mine[-1], lines


def test_a_password_in_the_tracking_uri_never_reaches_the_logs():
    from carefl.tracking import shown_uri

    assert shown_uri("https://ops:s3cret@mlflow.example.org:5000/x") == "https://ops:***@mlflow.example.org:5000/x"
    assert shown_uri("http://mlflow.example.org:5000") == "http://mlflow.example.org:5000"
    assert shown_uri("sqlite:////srv/carefl/mlflow.db") == "sqlite:////srv/carefl/mlflow.db"
