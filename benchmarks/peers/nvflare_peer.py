"""NVFlare peer, server side: ``FedAvgRecipe`` (PyTorch) run on the ``SimEnv`` simulator.

    <nvflare venv>/bin/python nvflare_peer.py DATA_DIR OUT_DIR

``task.py`` must be importable by the simulator's processes (``run.py`` puts this folder on
``PYTHONPATH``). One simulated site per hospital (named after it), one simulator thread per site (NVFlare's
default: every site's process stays up for the whole run; with fewer threads than sites the
simulator restarts a site's process every round, and here once ran one site on two threads and
hung for the 600 s download timeout), the shared initial weights,
``nvflare_client.py`` as every site's training script. The server builds ``task.UNet2D`` and
loads ``init.pt``. Copies the final global model to
``OUT_DIR/final.pt``; the simulator workspace stays in ``OUT_DIR/workspace``. Imports nothing
from CareFL.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import SimEnv

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import task  # noqa: E402


def main() -> None:
    data, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    spec = task.read_spec(data)
    hospitals = list(spec["hospitals"])
    recipe = FedAvgRecipe(
        name="peers", model={"class_path": "task.UNet2D", "args": task.unet_args(spec)},
        initial_ckpt=str(data / "init.pt"), min_clients=len(hospitals), num_rounds=int(spec["rounds"]),
        train_script=str(HERE / "nvflare_client.py"), train_args=f"--data {data} --out {out}", key_metric="dice",
    )
    env = SimEnv(clients=hospitals, num_threads=len(hospitals), workspace_root=str(out / "workspace"))
    recipe.execute(env)
    (final,) = (out / "workspace").rglob("FL_global_model.pt")
    saved = torch.load(final, weights_only=False)
    shutil.copy(final, out / "nvflare_global_model.pt")
    torch.save(saved.get("model", saved), out / "final.pt")


if __name__ == "__main__":
    main()
