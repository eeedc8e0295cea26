"""Typed configs: presets load, dotted overrides apply, bad keys and values are named."""


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
    with pytest.raises(ConfigError, match="neither a file nor a shipped preset .*tiny"):
        load_config("no-such-preset")


@pytest.mark.parametrize("override,needle", [
    ("name=../elsewhere", "run name '../elsewhere' must be one folder name"),
    ("name=a/b", "run name 'a/b'"),
    ("name=..", "run name '..'"),
    ("compare.methods=[{loss: dpo, label: ../../x}]", "method label '../../x'"),
    ("compare.methods=[{loss: dpo, label: 'a\\tb'}]", "method label"),
])
def test_names_that_become_folders_are_one_path_component(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config("tiny", [override])


def test_a_search_name_is_one_folder(tmp_path):
    from madpo_ray.tune_space import load_search_space

    f = tmp_path / "s.yaml"
    f.write_text("name: ../../x\nparams:\n  beta: {type: choice, values: [0.1]}\n")
    with pytest.raises(ConfigError, match="search name"):
        load_search_space(str(f))


def test_an_eval_label_is_one_folder(tmp_path):
    import subprocess
    import sys

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "eval", f"../up={tmp_path / 'm'}",
                           "--set", f"runs_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "label '../up' must be one folder name" in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists()


def test_derive_is_the_one_way_to_make_a_derived_config():
    from madpo_ray.config import LossConfig

    base = load_config("tiny")
    a = base.derive({"policy.optim.lr": 1e-5, "policy.loss": LossConfig(name="dpo", beta=0.3), "compare.tiers": None})
    b = base.derive(["policy.optim.lr=1e-5", "policy.loss={name: dpo, beta: 0.3}"])
    assert a == b and (a.policy.optim.lr, a.policy.loss.name, a.policy.loss.beta) == (1e-5, "dpo", 0.3)
    assert base.policy.loss.name == "madpo"  # the original is untouched
    with pytest.raises(ConfigError, match="policy.optim.lr"):
        base.derive({"policy.optim.lr": -1})


def test_resolved_gives_every_parameter_a_loss_trains_with():
    from madpo_ray.config import LossConfig
    from madpo_ray.losses import DEFAULT_TAU

    assert LossConfig(name="madpo", beta=2.0).resolved() == {"beta": 2.0, "c_max": 4.0, "lam": 1.0, "tau": DEFAULT_TAU}
    assert LossConfig(name="dpo").resolved() == {"beta": 0.1, "label_smoothing": 0.0}


@pytest.mark.parametrize("sets", [["data.validation_split=validation", "data.eval_split=validation"],
                                  ["data.eval_split=train"]])
def test_the_sealed_split_is_a_split_of_its_own(sets):
    with pytest.raises(ConfigError, match="eval_split"):
        load_config("tiny", sets)


def test_derive_names_a_key_whose_parent_is_a_value():
    with pytest.raises(ConfigError, match="'model.lora' is a value, not a section"):
        load_config("tiny").derive({"model.lora.r": 8})


@pytest.mark.parametrize("sets,needle", [
    (["compare.lr_grid=[1e-5, 1e-3]", "compare.methods=[{loss: dpo, overrides: {optim.lr: 1.0e-4}}, {loss: madpo}]"],
     "override optim.lr"),
    (["compare.lr_grid=[1e-5, 1.0000001e-5]"], "distinct to 6 significant digits"),
])
def test_an_lr_grid_point_trains_every_method_at_its_own_lr(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", sets)
