"""Config composition: defaults, overrides, one clear error per bad input."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from carefl.config import CONF_DIR, compose_config, validate
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
    for overrides in _options():
        cfg = compose_config(overrides)
        if overrides[0].split("=")[0] in {"model", "task"}:
            assert isinstance(build_model(cfg).state_dict(), dict)
    assert SEG | CLS == {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}


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


def test_missing_conf_dir_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        compose_config("", conf_dir=tmp_path)


SEG, CLS = {"unet", "basicunet"}, {"densenet121", "classifier"}


def _options() -> list[list[str]]:
    """Overrides selecting each option of each config group, with a task/model/size it fits."""
    out = []
    for group in sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            if group == "preprocess":  # preset files, not a Hydra group: chosen by data.preprocess
                out.append(["data=decathlon", f"data.preprocess={option}"])
                continue
            overrides = [f"{group}={option}"]
            if group == "model":
                overrides.append("task=cls2d" if option in CLS else "task=seg2d")
            if group == "task" and option.startswith("cls"):
                overrides.append("model=classifier")
            if group == "strategy":
                overrides.append("federation.hospitals=[a,b,c,d,e,f,g,h,i,j,k]")  # enough for Bulyan f=2
            out.append(overrides)
    return out


@pytest.mark.parametrize("overrides", _options(), ids=" ".join)
def test_every_group_option_validates_and_holds_no_interpolation(overrides):
    cfg = compose_config(overrides)
    validate(cfg)  # idempotent: what compose_config returns passes again (resume re-validates it)
    tree = OmegaConf.to_container(cfg, resolve=False)
    assert "hydra" not in tree
    for section in ("task", "model", "data", "privacy", "federation", "strategy", "attack"):
        assert "${" not in repr(tree[section]), section


@pytest.mark.parametrize(
    "overrides",
    [  # README "Run" examples
        "strategy=robust federation.rounds=10",
        "task=cls2d model=classifier privacy.target_epsilon=4",
        "privacy=none strategy=krum federation.hospitals=[a,b,c,d,e]",
        "federation.hospitals=[a,b,c,d,e]",
        "strategy=median attack=signflip",
    ],
)
def test_readme_examples_validate(overrides):
    compose_config(overrides)


def _rejected(overrides: str, *names: str) -> str:
    """The one-line ConfigError of ``overrides``; it must name every one of ``names``."""
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.mark.parametrize("lr", ["0", "-0.1", "nan", "inf", "-inf", "abc", "true"])
def test_learning_rate_must_be_finite_and_positive(lr):
    _rejected(f"federation.lr={lr}", f"federation.lr={lr if lr != 'abc' else repr(lr)}", "e.g. federation.lr=")


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        ("privacy.accountant=gdp", "privacy.accountant='gdp'", ["prv", "rdp"]),
        ("federation.optimizer=adamw", "federation.optimizer='adamw'", ["adam", "sgd"]),
        ("privacy.grad_sample_mode=ew", "privacy.grad_sample_mode='ew'", ["hooks", "functorch"]),
        ("task.kind=detection", "task.kind='detection'", ["segmentation", "classification"]),
        ("model.name=resnet", "model.name='resnet'", ["unet", "basicunet", "classifier", "densenet121"]),
    ],
)
def test_unknown_choice_lists_the_allowed_ones(overrides, key, allowed):
    message = _rejected(overrides, key)
    for choice in allowed:
        assert repr(choice) in message or f"{choice}" in message


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        ("data.image_size=50", "data.image_size=50", "a multiple of 4"),  # unet strides [2,2]
        ("data.image_size=12 model.strides=[2,4]", "data.image_size=12", "a multiple of 8"),
        ("task=seg3d data.image_size_3d=30", "data.image_size_3d=30", "data.image_size_3d=32"),
        ("model=basicunet data.image_size=15", "data.image_size=15", "at least 16"),
        ("task=cls2d model=densenet121 data.image_size=28", "data.image_size=28", "at least 29"),
        ("task=cls3d model=densenet121 data.image_size_3d=24", "data.image_size_3d=24", "at least 29"),
        ("data=decathlon data.spatial_size=[64,62]", "data.spatial_size=[64, 62]", "data.spatial_size=[64,64]"),
        ("data=decathlon data.spatial_size=[64,64,64]", "data.spatial_size", "task.spatial_dims=2"),
        ("data.image_size=4", "data.image_size=4", "from 8"),
    ],
)
def test_image_size_must_fit_the_net(overrides, key, fix):
    _rejected(overrides, key, fix)


@pytest.mark.parametrize(
    "model, task, key, sides",
    [
        ("unet", "seg2d", "data.image_size", [8, 10, 12, 14, 16]),
        ("unet", "seg3d", "data.image_size_3d", [8, 10]),
        ("basicunet", "seg2d", "data.image_size", [14, 15, 16, 17]),
        ("densenet121", "cls2d", "data.image_size", [27, 28, 29, 30]),
        ("classifier", "cls2d", "data.image_size", [8, 9, 11]),
    ],
)
def test_size_rule_is_what_the_net_runs_on(model, task, key, sides):
    """validate accepts a side exactly when the built net runs a forward pass on it."""
    net = build_model(compose_config(f"model={model} task={task}")).eval()
    for side in sides:
        try:
            compose_config(f"model={model} task={task} {key}={side}")
            accepted = True
        except ConfigError:
            accepted = False
        dims = 3 if task.endswith("3d") else 2
        x = torch.zeros(2, 1, *[side] * dims)
        try:
            with torch.no_grad():
                y = net(x)
            ran = y.shape[2:] == x.shape[2:] if task.startswith("seg") else tuple(y.shape) == (2, 2)
        except RuntimeError:
            ran = False
        assert accepted == ran, (model, side, accepted, ran)


def test_sigma_without_target_epsilon_validates_but_one_of_them_is_needed():
    cfg = compose_config("privacy.target_epsilon=null privacy.noise_multiplier=1.0")
    assert cfg.privacy.target_epsilon is None and cfg.privacy.noise_multiplier == 1.0
    _rejected("privacy.target_epsilon=null", "privacy.target_epsilon=null", "privacy.noise_multiplier")
    compose_config("privacy=none")  # without DP neither is read


@pytest.mark.parametrize(
    "override",
    [
        "federation.rounds=0", "federation.rounds=10001", "federation.local_epochs=0",
        "federation.local_epochs=1001", "federation.batch_size=0", "federation.batch_size=4097",
        "federation.min_hospitals=0", "federation.min_hospitals=4", "federation.round_timeout_s=0",
        "federation.round_timeout_s=inf", "federation.round_timeout_s=nan", "federation.torch_threads=0",
        "federation.torch_threads=257", "privacy.target_epsilon=0", "privacy.target_epsilon=inf",
        "privacy.target_delta=0", "privacy.target_delta=1", "privacy.noise_multiplier=0",
        "privacy.noise_multiplier=nan", "privacy.max_grad_norm=0", "privacy.max_grad_norm=inf",
        "strategy.prox_mu=-0.1", "strategy.prox_mu=nan", "strategy.prox_mu=inf", "data.n_train=0",
        "data.n_train=100001", "data.n_test=0", "data.image_size_3d=7", "data=decathlon data.test_fraction=0",
        "data=decathlon data.test_fraction=1", "seed=-1", "task.spatial_dims=4", "task.in_channels=0",
        "task.num_classes=0", "task=cls2d model=classifier task.num_classes=1", "model.norm_groups=0",
        "model.num_res_units=-1",
    ],
)
def test_numbers_out_of_range_name_key_and_value(override):
    _rejected(override, override.split()[-1])


@pytest.mark.parametrize(
    "override, shown",
    [
        ("federation.rounds=abc", "federation.rounds='abc'"),
        ("federation.rounds=2.5", "federation.rounds=2.5"),
        ("federation.rounds=true", "federation.rounds=true"),
        ("federation.batch_size=32.0", "federation.batch_size=32.0"),
        ("seed=1.5", "seed=1.5"),
        ("privacy.enabled=1", "privacy.enabled=1"),
        ("privacy.secure_mode=yes", "privacy.secure_mode='yes'"),
        ("federation.baselines=null", "federation.baselines=null"),
        ("privacy.target_delta=small", "privacy.target_delta='small'"),
        ("model.strides=[2,2.5]", "model.strides=[2, 2.5]"),
        ("model.channels=16", "model.channels=16"),
    ],
)
def test_wrong_types_are_refused(override, shown):
    _rejected(override, shown)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ("model.strides=[2]", "model.strides"),  # UNet: one stride fewer than channels
        ("task=cls2d model=classifier model.strides=[2,2]", "model.strides"),  # one per channel width
        ("model=basicunet model.features=[8,16,32]", "model.features"),
        ("task=seg2d task.loss=ce", "task.loss"),
        ("task=cls2d model=unet", "model=unet"),
    ],
)
def test_model_and_task_shape(overrides, key):
    _rejected(overrides, key)


@pytest.mark.parametrize(
    "override, key",
    [
        ("federation.hospitals=[a,../b,c]", "federation.hospitals"),
        ("federation.hospitals=[a,.b,c]", "federation.hospitals"),
        ("federation.hospitals=[a,b/c,d]", "federation.hospitals"),
        ("federation.hospitals=[a,b,1]", "federation.hospitals"),
        (f"federation.hospitals=[a,b,{'x' * 65}]", "federation.hospitals"),
        ("run_id=../x", "run_id"),
        ("run_id=.hidden", "run_id"),
        ("run_id=a/b", "run_id"),
        ("run_id=..", "run_id"),
        ("data.name=a/b", "data.name"),
        ("task.name=../x", "task.name"),
    ],
)
def test_names_that_become_file_names_must_be_safe(override, key):
    _rejected(override, key)


@pytest.mark.parametrize(
    "override", ["run_id=st-mary.2", "run_id=42", "run_id=null", "federation.hospitals=[A_1,b.2,c-3]"]
)
def test_safe_names_pass(override):
    compose_config(override)


@pytest.mark.parametrize(
    "override",
    ["run_id=${oc.env:CAREFL_TEST_SECRET}", "privacy.target_delta=${oc.env:CAREFL_TEST_SECRET}",
     "federation.hospitals=[a,b,${oc.env:CAREFL_TEST_SECRET}]", "+data.x=${seed}"],
)
def test_override_interpolation_is_refused_without_resolving_it(override, monkeypatch):
    monkeypatch.setenv("CAREFL_TEST_SECRET", "s3cr3t-value")
    message = _rejected(override, override)
    assert "s3cr3t-value" not in message


@pytest.mark.parametrize("key", ["run_id", "privacy.target_delta", "federation.lr", "attack.name"])
def test_interpolation_in_a_config_tree_is_refused_by_key(key, monkeypatch):
    """validate also sees configs that did not come through compose_config (carefl-sim -m, resume)."""
    monkeypatch.setenv("CAREFL_TEST_SECRET", "s3cr3t-value")
    cfg = compose_config()
    OmegaConf.update(cfg, key, "${oc.env:CAREFL_TEST_SECRET}")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate(cfg)
    assert "s3cr3t-value" not in str(err.value)


def test_saved_config_of_an_older_run_validates(tmp_path):
    """resume validates the run's own config.yaml; runs saved before grad_sample_mode train with hooks."""
    OmegaConf.save(compose_config(), tmp_path / "config.yaml", resolve=True)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    del saved.privacy["grad_sample_mode"]
    validate(saved)
    saved.federation.rounds = "6"
    with pytest.raises(ConfigError, match="federation.rounds='6'"):
        validate(saved)


@pytest.mark.parametrize(
    "override",
    ["federation.rounds=10000", "federation.batch_size=4096", "federation.local_epochs=1000",
     "federation.torch_threads=256", "federation.min_hospitals=3", "federation.lr=1", "data.image_size=8",
     "data.n_train=1", "strategy.prox_mu=0", "seed=0", "privacy.target_delta=0.5", "federation.round_timeout_s=0.5"],
)
def test_edges_of_the_ranges_pass(override):
    compose_config(override)


@pytest.mark.parametrize("override, names", [
    ("+federation.hospital_keys.st-mary=abc", ["federation.hospital_keys.st-mary", "carefl-keygen"]),
    ('+federation.hospital_keys.nobody="mNLKMcFWo6G3ZcY51ibNdna1Pfp4P/kK9WVjYmZzu60="', ["nobody", "federation.hospitals"]),
    ("+federation.site_policies={st-mary:{epsilon_cap:3}}", ["federation.site_policies.st-mary", "epsilon_cap"]),
    ("federation.max_update_norm_ratio=0.5", ["federation.max_update_norm_ratio"]),
    ("federation.max_update_norm=-1", ["federation.max_update_norm"]),
])
def test_trust_settings_are_checked_at_the_edge(override, names):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert all(name in str(err.value) for name in names)


def test_one_string_of_overrides_keeps_the_quotes_hydra_needs():
    """What `flwr run --run-config "overrides='...'"` and carefl-run deliver as one string: a
    registered key, quoted as carefl-keygen prints it, reaches Hydra quoted (base64 has '/',
    '+' and '='), where shell splitting dropped the quotes and Hydra refused the override."""
    from carefl.config import split_overrides

    key = "v/jPgDNZ1ct5sd8xKMw8Qeopbg5tliUR0jU5zgd+87Y="  # a real Ed25519 public key, with all three
    text = f"""federation.rounds=2   '+federation.hospitals=[st-mary,riverside,northfield]' +federation.hospital_keys.st-mary="{key}" """
    assert split_overrides(text) == ["federation.rounds=2", "+federation.hospitals=[st-mary,riverside,northfield]",
                                     f'+federation.hospital_keys.st-mary="{key}"']
    cfg = compose_config(f'federation.rounds=2 +federation.hospital_keys.st-mary="{key}"')
    assert cfg.federation.hospital_keys["st-mary"] == key
    with pytest.raises(ConfigError, match="never closed"):
        split_overrides('run_id="a b')


@pytest.mark.parametrize("override", ["model.channels=abc", "model=densenet121", "task.loss=ce",
                                      "privacy.accountant=moments", "privacy.grad_sample_mode=ew",
                                      "+federation.hospital_keys.st-mary=abc", "tracking=mlfow"])
def test_a_bad_override_is_answered_before_torch_monai_or_opacus_is_imported(override):
    """carefl-sim and the ServerApp check overrides first: refusing one must not cost the ~2 s
    of importing torch, MONAI and Opacus (the names to check against are in carefl.choices)."""
    import subprocess
    import sys

    code = ("import sys\nfrom carefl.config import compose_config\nfrom carefl.errors import ConfigError\n"
            f"try:\n    compose_config({override!r})\nexcept ConfigError as err:\n    print('refused:', err)\n"
            "print(sorted(m for m in ('torch', 'monai', 'opacus') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout + done.stderr
