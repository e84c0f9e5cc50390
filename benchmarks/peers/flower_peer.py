"""Flower peer: the federation as Flower's own quickstart-monai / opacus examples would run it.

    <flower venv>/bin/python flower_peer.py DATA_DIR OUT_DIR

A ServerApp (the Message API's ``FedAvg``: weighted by ``num-examples``, train then evaluate on
every hospital each round) and a ClientApp that re-creates its model (and, under DP, its Opacus
PrivacyEngine) on every message, as those examples do. Run on Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray, one CPU per hospital), the same engine ``carefl-sim``
uses. Writes ``OUT_DIR/server.json`` (round end times in s since the start, the server's
``ru_maxrss``), ``OUT_DIR/clients.jsonl`` (one line per hospital and round) and
``OUT_DIR/final.pt`` (the final global state dict). Imports nothing from CareFL.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402  (this folder; Ray workers inherit sys.path through PYTHONPATH below)

DATA, OUT = Path(os.environ.get("PEER_DATA", ".")), Path(os.environ.get("PEER_OUT", "."))
client = ClientApp()


def _received(msg: Message, context: Context):
    """``(spec, this node's hospital, the UNet holding the global weights just received)``."""
    spec = task.read_spec(DATA)
    model = task.build_unet(spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return spec, spec["hospitals"][int(context.node_config["partition-id"])], model


def _log(record: dict) -> None:
    with open(OUT / "clients.jsonl", "a") as f:  # one short O_APPEND write per line
        f.write(json.dumps({**record, "max_rss_bytes": task.max_rss_bytes(), "pid": os.getpid()}) + "\n")


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train locally, reply with the weights and ``num-examples``."""
    spec, hospital, model = _received(msg, context)
    train_set, _ = task.load_site(DATA, hospital)
    rnd = int(msg.content["config"]["server-round"])
    out = task.train(model, train_set, spec, round_seed=rnd)
    _log({"hospital": hospital, "round": rnd, "phase": "train", **out})
    metrics = MetricRecord({"train_loss": out["loss"], "num-examples": out["num_examples"]})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the global model on this hospital's test split."""
    _, hospital, model = _received(msg, context)
    _, test_set = task.load_site(DATA, hospital)
    out = task.evaluate(model, test_set)
    _log({"hospital": hospital, "round": int(msg.content["config"]["server-round"]), "phase": "eval", **out})
    return Message(RecordDict({"metrics": MetricRecord({"dice": out["dice"], "num-examples": len(test_set)})}),
                   reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over all hospitals for ``spec["rounds"]`` rounds from the shared initial weights."""
    spec = task.read_spec(DATA)
    n = len(spec["hospitals"])
    start, ends = time.perf_counter(), []

    def stamp(server_round: int, arrays: ArrayRecord) -> None:  # called before round 1 and after each round
        ends.append(time.perf_counter() - start)

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                      min_available_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch.load(DATA / "init.pt")),
                            num_rounds=int(spec["rounds"]), evaluate_fn=stamp)
    torch.save(result.arrays.to_torch_state_dict(), OUT / "final.pt")
    (OUT / "server.json").write_text(json.dumps({"round_ends_s": ends, "max_rss_bytes": task.max_rss_bytes()}))


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    DATA, OUT = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    os.environ.update(PEER_DATA=str(DATA), PEER_OUT=str(OUT),
                      PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
    n = len(task.read_spec(DATA)["hospitals"])
    run_simulation(server_app=server, client_app=client, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}})
