"""Hydra entry point: run a CareFL simulation in-process, so Hydra sweeps work.

    carefl-sim                                   # the default federation
    carefl-sim strategy=median federation.rounds=3
    carefl-sim -m strategy=fedavg,median attack=none,signflip   # one simulation per combination

Same ServerApp/ClientApp code as ``flwr run .``; the config comes from Hydra's command line
instead of ``--run-config``. Each job writes its own ``<output_dir>/<run-id>/``.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from omegaconf import DictConfig

from carefl.config import CONF_DIR, compose_config, validate
from carefl.errors import CareFLError
from client_app.app import app as client_app
from carefl.rounds import log, run_federation
from server_app.app import FlowerTransport, _setup_logging


def simulate(cfg: DictConfig, overrides: list[str] = (), cpus_per_hospital: float = 1.0) -> None:
    """Run the federation described by ``cfg`` on Flower's simulation engine (Ray).

    ``overrides``: the ones given on the command line (checked on ``resume=``)."""
    validate(cfg)
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        _setup_logging()
        try:
            run_federation(FlowerTransport(grid), cfg, overrides)
        except CareFLError as err:
            log.error("%s", err)
            raise

    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=len(cfg.federation.hospitals),
        backend_config={"client_resources": {"num_cpus": cpus_per_hospital, "num_gpus": 0.0}},
    )


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        simulate(cfg, list(HydraConfig.get().overrides.task))
    except CareFLError as err:
        raise SystemExit(f"carefl-sim: {err}") from None


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
