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
