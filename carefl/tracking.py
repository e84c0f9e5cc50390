"""TensorBoard event files of a run: the ecosystem's viewer, over the same figures as ``metrics.json``.

``<run_dir>/tensorboard/`` gets one scalar per figure and round (step = round number),
written with ``torch.utils.tensorboard`` (the ``tensorboard`` package) after each round's
checkpoint, so ``tensorboard --logdir outputs`` follows running federations live:

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

The event files are a view: ``metrics.json`` stays the record (its hash is in the ledger; the
event files' are not).
"""

from __future__ import annotations

import math
from pathlib import Path


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


class Tracker:
    """Writes each round once; the event file is opened at the first round it writes."""

    def __init__(self, run_dir: Path, metric_names: tuple[str, ...]) -> None:
        self.directory, self.metric_names = Path(run_dir) / "tensorboard", metric_names
        self.written: set[int] = set()
        self._writer = None

    def log_rounds(self, rounds: list[dict]) -> None:
        """Write the rounds not written yet (a resumed run marks its earlier ones written)."""
        for record in rounds:
            if record["round"] in self.written or "timing" not in record:  # only completed rounds
                continue
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

                self._writer = SummaryWriter(str(self.directory))
            for tag, value in round_scalars(record, self.metric_names).items():
                self._writer.add_scalar(tag, value, global_step=record["round"])
            self.written.add(record["round"])
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
