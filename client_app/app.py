"""CareFL ClientApp (Flower 1.41 Message API): one hospital, messages <-> ``carefl.hospital.handle``.

Everything a hospital's privacy rests on comes from its SuperNode's node config (its operator's,
see ``carefl/site.py``); from the server it takes only the request JSON (checked against
``carefl/request.py``) and the global model.

Message content in: ``arrays`` (ArrayRecord, the global model), ``config`` (ConfigRecord,
``request``: JSON text). Out: ``status`` (ConfigRecord: ``hospital``, ``status`` ok | refused,
``reason``, ``receipt``: signed receipt JSON or "", ``secagg``: JSON or ""), ``metrics``
(MetricRecord) and, for a trained round (or a masked input), ``arrays``. Secure-aggregation
stages arrive as ``train.secagg`` messages with ``config`` ``request`` and ``secagg``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from carefl import console_logging
from carefl.hospital import EVALUATE, SECAGG, TRAIN, handle

app = ClientApp()



def _reply(msg: Message, context: Context, kind: str) -> Message:
    console_logging()  # the hospital's console: its training progress, its refusals
    config = msg.content["config"] if "config" in msg.content else {}
    state = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}
    reply = handle(kind, config.get("request"), state, context.node_config, config.get("secagg"))
    content = RecordDict({"metrics": MetricRecord(reply.metrics), "status": ConfigRecord(reply.status_record())})
    if reply.state is not None:
        content["arrays"] = ArrayRecord(reply.state)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally (DP-SGD unless the hospital's policy allows
    otherwise and the request asks so), or refuse with the reason."""
    return _reply(msg, context, TRAIN)


@app.train("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """One stage of secure aggregation (``config``: ``request`` and the stage's ``secagg`` JSON)."""
    return _reply(msg, context, SECAGG)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this hospital's held-out split."""
    return _reply(msg, context, EVALUATE)
