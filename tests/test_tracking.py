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
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = []
        for record in metrics["rounds"]:
            value = record
            for key in path:
                value = value[key]
            expected.append((record["round"], value))
        assert [s for s, _ in logged] == [1, 2]
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
