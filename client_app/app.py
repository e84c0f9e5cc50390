"""CareFL ClientApp (Flower 1.41 Message API): one hospital, messages <-> ``carefl.hospital``.

The hospital's own settings come from its SuperNode's node config (never from the server):
``hospital``, ``data-path``, ``state-dir``, ``epsilon-cap``, ``delta``, ``site-policy``,
``torch-threads``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from carefl.config import from_json
from carefl.hospital import evaluate_round, identify, train_round

app = ClientApp()


def _request(msg: Message, context: Context):
    config = msg.content["config"]
    cfg = from_json(str(config["cfg"]))
    torch.set_num_threads(int(context.node_config.get("torch-threads", cfg.federation.torch_threads)))
    hospital = identify(cfg, context.node_config, str(config["run-dir"]))
    state = msg.content["arrays"].to_torch_state_dict()
    return cfg, hospital, state, int(config["round"])


def _status(hospital: str, status: str = "ok", reason: str = "") -> ConfigRecord:
    return ConfigRecord({"hospital": hospital, "status": status, "reason": reason})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally (DP-SGD if enabled) or refuse on budget."""
    cfg, hospital, state, server_round = _request(msg, context)
    reply = train_round(cfg, hospital, state, server_round)
    metrics = {**reply.metrics, "simulated": float(hospital.simulated)}
    content = RecordDict({"metrics": MetricRecord(metrics), "status": _status(reply.hospital, reply.status, reply.reason)})
    if reply.state is not None:
        content["arrays"] = ArrayRecord(reply.state)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this hospital's held-out split."""
    cfg, hospital, state, _ = _request(msg, context)
    metrics = evaluate_round(cfg, hospital, state)
    content = RecordDict({"metrics": MetricRecord(metrics), "status": _status(hospital.name)})
    return Message(content=content, reply_to=msg)
