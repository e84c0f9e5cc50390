"""Config composition: defaults, overrides, one clear error per bad input."""

from pathlib import Path

import pytest

from carefl.config import CONF_DIR, compose_config, from_json, to_json
from carefl.errors import ConfigError
from carefl.models import build_model


def test_default_config_is_the_documented_federation():
    cfg = compose_config()
    assert list(cfg.federation.hospitals) == ["st-mary", "riverside", "northfield"]
    assert cfg.task.name == "seg2d" and cfg.model.name == "unet" and cfg.data.name == "synthetic"
    assert cfg.privacy.enabled is True  # DP on by default
    assert cfg.strategy.name == "fedavg" and cfg.attack.name == "none"


def test_overrides_as_string_with_quoting_and_list():
    cfg = compose_config("strategy=median 'federation.hospitals=[a,b,c,d]' federation.rounds=3")
    assert cfg.strategy.rule.name == "median"
    assert list(cfg.federation.hospitals) == ["a", "b", "c", "d"] and cfg.federation.rounds == 3
    assert compose_config(["privacy=none"]).privacy.enabled is False


def test_every_config_group_file_composes_with_a_matching_task():
    """Every file in every group composes; models build for a task they support."""
    seg, cls = {"unet", "basicunet"}, {"densenet121", "classifier"}
    for group in sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            overrides = [f"{group}={option}"]
            if group == "model":
                overrides.append("task=cls2d" if option in cls else "task=seg2d")
            if group == "task" and option.startswith("cls"):
                overrides.append("model=classifier")
            if group == "strategy":
                overrides.append("federation.hospitals=[a,b,c,d,e,f,g,h,i,j,k]")  # enough for Bulyan f=2
            cfg = compose_config(overrides)
            if group in {"model", "task"}:
                assert isinstance(build_model(cfg).state_dict(), dict)
    assert seg | cls == {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}


@pytest.mark.parametrize(
    "overrides, names",
    [
        ("strategy=nonexistent", ["strategy=nonexistent"]),
        ("federation.nonexistent=1", ["nonexistent"]),
        ("privacy.target_epsilon=-1", ["privacy.target_epsilon"]),
        ("federation.hospitals=[]", ["federation.hospitals"]),
        ("federation.rounds=0", ["federation.rounds"]),
        ("federation.min_hospitals=4", ["federation.min_hospitals"]),
        ("strategy=krum strategy.f=1", ["krum", "strategy.f"]),
        ("attack=signflip attack.byzantine=[7]", ["attack.byzantine"]),
    ],
)
def test_bad_config_is_one_clear_error_naming_the_key(overrides, names):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_model_task_mismatch_names_the_model_key():
    with pytest.raises(ConfigError, match="model="):
        build_model(compose_config("task=cls2d model=unet"))


def test_json_round_trip_is_what_hospitals_receive():
    cfg = compose_config("strategy=robust")
    assert from_json(to_json(cfg)) == cfg


def test_missing_conf_dir_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        compose_config("", conf_dir=tmp_path)
