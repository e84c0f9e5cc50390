"""NVFlare peer, hospital side: a Client API (``nvflare.client``) training script.

Run by NVFlare inside each site's client process (``FedAvgRecipe(train_script=...)``); the site
name is the hospital's. Each round: receive the global model, evaluate it on the test split,
train locally, send the weights with ``NUM_STEPS_CURRENT_ROUND`` = training examples (the
weight NVFlare's FedAvg averages by). Appends one line per round to ``OUT/clients.jsonl``
(``received_at``: wall clock, s since the epoch, when the global model arrived). Imports
nothing from CareFL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    spec = task.read_spec(args.data)
    flare.init()
    hospital = flare.get_site_name()
    train_set, test_set = task.load_site(args.data, hospital)
    while flare.is_running():
        received = flare.receive()
        received_at = time.time()
        model = task.build_unet(spec)  # fresh each round: Opacus' hooks stay on a module it wrapped
        model.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
        ev = task.evaluate(model, test_set)  # the global model of the previous round
        tr = task.train(model, train_set, spec, round_seed=received.current_round + 1)
        with open(args.out / "clients.jsonl", "a") as f:
            f.write(json.dumps({"hospital": hospital, "round": received.current_round + 1, "received_at": received_at,
                                **ev, **tr, "max_rss_bytes": task.max_rss_bytes(), "pid": os.getpid()}) + "\n")
        flare.send(FLModel(params=model.state_dict(),  # torch tensors: the PyTorch recipe drops numpy arrays
                           metrics={"dice": ev["dice"]}, meta={"NUM_STEPS_CURRENT_ROUND": tr["num_examples"]}))


if __name__ == "__main__":
    main()
