"""A hospital's identity and site settings come from its own node config."""

import pytest

from carefl.config import compose_config
from carefl.errors import ConfigError
from carefl.hospital import identify


def test_deployment_node_config_names_the_hospital_its_data_and_state():
    cfg = compose_config()
    h = identify(cfg, {"hospital": "riverside", "data-path": "/data/dl.json", "state-dir": "/state"}, "/run")
    assert (h.name, h.index, h.data_path, str(h.state_dir), h.simulated) == ("riverside", 1, "/data/dl.json", "/state", False)


def test_simulation_maps_partitions_to_hospitals_and_site_policies():
    cfg = compose_config(["+federation.site_policies={northfield:{epsilon-cap:2.5}}"])
    h = identify(cfg, {"partition-id": 2, "num-partitions": 3}, "/run")
    assert (h.name, h.simulated, h.node_config["epsilon-cap"]) == ("northfield", True, 2.5)
    assert str(h.state_dir) == "/run/hospitals/northfield"
    real = identify(cfg, {"hospital": "northfield"}, "/run")  # a real SuperNode never gets it
    assert "epsilon-cap" not in real.node_config


@pytest.mark.parametrize(
    "node_config, fragment",
    [
        ({"hospital": "st-mary", "epsilon_cap": 3.0}, "epsilon_cap"),  # typo: would drop the cap
        ({"data-path": "/x"}, "hospital="),
        ({"partition-id": 0, "num-partitions": 2}, "num-supernodes=3"),
    ],
)
def test_bad_node_config_is_one_error_naming_the_key(node_config, fragment):
    with pytest.raises(ConfigError, match=fragment):
        identify(compose_config(), node_config, "/run")
