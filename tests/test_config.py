"""Typed configs: presets load, dotted overrides apply, bad keys and values are named."""

import math

import pytest

from madpo_ray.config import ConfigError, load_config, save_config


def test_tiny_preset_and_overrides(tmp_path):
    cfg = load_config("tiny", ["policy.loss.beta=0.2", "ray.num_workers=1", "policy.loss.name=dpo"])
    assert cfg.policy.loss.beta == 0.2 and cfg.ray.num_workers == 1 and cfg.policy.loss.name == "dpo"
    assert cfg.policy.loss.tau is None  # unset: dpo takes no tau, and madpo would use its own default
    assert load_config("tiny").policy.loss.kwargs() == {"beta": 2.0}
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg  # round trip


@pytest.mark.parametrize("override,needle", [
    ("policy.loss.betta=0.2", "unknown config key 'policy.loss.betta'"),
    ("policy.loss.beta=-1", "config key 'policy.loss.beta'"),
    ("policy.loss.beta=abc", "'abc'"),
    ("policy.loss.name=ppo", "unknown loss 'ppo'"),
    ("policy.loss.c_max=1", "config key 'policy.loss.c_max'"),
    ("ray.num_workers=0", "config key 'ray.num_workers'"),
    ("data.max_prompt_length=999", "max_prompt_length (999) must be < max_length"),
    ("model.hidden_size=30", "divisible by num_heads"),
    ("noequals", "dotted.key=value"),
    ("ray.num_workers.x=1", "'ray.num_workers' is a value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert needle in str(err.value)


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-preset")
