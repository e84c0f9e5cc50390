"""Hydra entry point: run a CareFL simulation in-process, so Hydra sweeps work.

    carefl-sim                                   # the default federation
    carefl-sim strategy=median federation.rounds=3
    carefl-sim -m strategy=fedavg,median attack=none,signflip   # one simulation per combination

Same ServerApp/ClientApp code as ``flwr run .``; the config comes from Hydra's command line
instead of ``--run-config``. Each job writes its own ``<output_dir>/<run-id>/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Only the config edge is imported up front: a bad override is answered before torch, MONAI
# and Flower load (seconds on a busy machine); they are imported when a run starts.
from carefl.config import CONF_DIR, compose_config, validate
from carefl.errors import CareFLError


def _no_run_simulation_notice(record: logging.LogRecord) -> bool:
    return "`run_simulation` function is deprecated" not in record.getMessage()


def simulate(cfg: DictConfig, overrides: list[str] = (), cpus_per_hospital: float = 1.0) -> str:
    """Run the federation described by ``cfg`` on Flower's simulation engine (Ray).

    ``overrides``: the ones given on the command line (checked on ``resume=``). Returns the
    run's status (``completed`` | ``stopped``, from its ``metrics.json``), or ``failed`` when
    the server ended without writing one (an error, logged)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from carefl.rounds import log, run_federation
    from client_app.app import app as client_app
    from carefl import console_logging
    from server_app.app import FlowerTransport

    validate(cfg)
    # carefl-sim calls run_simulation on purpose (Hydra sweeps run in-process): Flower's notice
    # that `flwr run` is preferred says nothing to a CareFL user. Ray's tip about visible GPUs
    # with num_gpus=0 is answered by adopting its coming default now (simulated hospitals train
    # on the CPU either way: CareFL never moves a model to CUDA by itself).
    logging.getLogger("flwr").addFilter(_no_run_simulation_notice)  # once, however many jobs a sweep runs
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    server = ServerApp()
    ended: dict[str, Path] = {}  # run_simulation runs the ServerApp in this process

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        console_logging()
        try:
            ended["run_dir"] = run_federation(FlowerTransport(grid), cfg, overrides)
        except CareFLError as err:
            log.error("%s", err)
            raise

    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=len(cfg.federation.hospitals),
        backend_config={"client_resources": {"num_cpus": cpus_per_hospital, "num_gpus": 0.0}},
    )
    if "run_dir" not in ended:
        return "failed"
    return json.loads((ended["run_dir"] / "metrics.json").read_text()).get("status", "failed")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    """Exit status 0 only for a completed run: 1 when it stopped early (too few usable updates,
    every hospital refused or failed) or the server failed, so scripts and CI see it. In a
    sweep (``-m``) such a job is logged as an error and the sweep goes on."""
    try:
        status = simulate(cfg, list(HydraConfig.get().overrides.task))
    except CareFLError as err:
        raise SystemExit(f"carefl-sim: {err}") from None
    if status != "completed":
        message = f"carefl-sim: the run ended {status}; its log above and metrics.json say why"
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # one job's end must not cut the sweep short
            from carefl.rounds import log

            log.error("%s", message)
        else:
            raise SystemExit(message)


def main() -> None:
    """``carefl-sim`` console script. A single run's overrides are checked first, so a bad
    key or value is one line naming it (Hydra's own report spans several); sweeps (``-m``)
    and Hydra flags go to Hydra as they are."""
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):
        try:
            compose_config([a for a in args if not a.startswith("hydra.")])
        except CareFLError as err:
            raise SystemExit(f"carefl-sim: {err}") from None
    _hydra_main()
