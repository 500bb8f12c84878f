"""config.py: the embedded default, typed overrides, and errors that name the key path and the bad value."""
from __future__ import annotations

import msgspec
import pytest
import yaml

from npr_async.config import CONFIG_DIR, DEFAULT_CONFIG, Config, ConfigError, dump_yaml, load_config, to_dict


def test_embedded_default_loads_and_matches_its_yaml():
    cfg = load_config()
    assert isinstance(cfg, Config)
    tree, loaded = yaml.safe_load(DEFAULT_CONFIG.read_text()), to_dict(cfg)

    def check(node, got, path):
        for key, value in node.items():
            if isinstance(value, dict):
                check(value, got[key], f"{path}{key}.")
            else:
                assert got[key] == value, f"{path}{key}"
    check(tree, loaded, "")
    assert cfg.learner.lr == 5e-5 and cfg.model.preset == "tiny" and cfg.stage == "stage2+3"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert load_config(path) == cfg and isinstance(cfg.engine.max_plans, int)


def test_overrides_convert_types():
    cfg = load_config(None, ["learner.lr=3e-5", "engine.parallel=false", "engine.max_plans=3",
                             "rollout.sampling.top_p=0.7", "verifier.plugins.mine=pkg.mod:Check",
                             "model.path=2024", "data.train=1e-4", "logging.progress=plain", "stage=stage1"])
    assert cfg.learner.lr == 3e-5 and isinstance(cfg.learner.lr, float)
    assert cfg.engine.parallel is False and cfg.engine.max_plans == 3
    assert cfg.rollout.sampling.top_p == 0.7 and cfg.verifier.plugins == {"mine": "pkg.mod:Check"}
    assert cfg.model.path == "2024" and cfg.data.train == "1e-4"  # string fields keep the text as typed
    assert cfg.logging.progress == "plain" and cfg.stage == "stage1"
    assert load_config(None, ["learner.lr=2"]).learner.lr == 2.0


def test_yaml_file_exponent_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner: {lr: 1e-5, sft_lr: 2E-3, loss: 1e-4}\n")  # YAML 1.1 reads these as strings
    cfg = load_config(p)
    assert cfg.learner.lr == 1e-5 and cfg.learner.sft_lr == 2e-3
    assert cfg.learner.loss == "1e-4"  # a string field stays a string


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["engine.max_plans=4", "learner.lr=5e-7"])
    p = tmp_path / "dumped.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg


def error_of(path=None, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("override,key,value", [
    ("learner.lrr=1", "learner.lrr", "1"),  # misspelt key
    ("learnr.lr=1", "learnr", "{'lr': 1}"),  # misspelt section
    ("engine.max_plans=abc", "engine.max_plans", "'abc'"),  # wrong type
    ("learner.lr=true", "learner.lr", "True"),
    ("engine.parallel=maybe", "engine.parallel", "'maybe'"),
    ("engine.max_plans=0", "engine.max_plans", "0"),  # out of range
    ("engine.max_plans=99", "engine.max_plans", "99"),
    ("rollout.sampling.top_p=2", "rollout.sampling.top_p", "2"),
    ("learner.lr=-1e-4", "learner.lr", "-0.0001"),
    ("controller.max_staleness=1", "controller.max_staleness", "1"),
    ("stage=stage9", "stage", "'stage9'"),  # not one of the choices
    ("engine.decode_gemm=cublas", "engine.decode_gemm", "'cublas'"),
    ("engine=3", "engine", "3"),
])
def test_bad_override_names_key_and_value(override, key, value):
    msg = error_of(overrides=[override])
    assert f"at key `{key}`" in msg and f"(value: {value})" in msg, msg


def test_bad_file_values_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("engine:\n  max_plan: 3\n")
    msg = error_of(p)
    assert str(p) in msg and "at key `engine.max_plan`" in msg and "(value: 3)" in msg
    p.write_text("rollout:\n  sampling: {temperature: -1.0}\n")
    assert "at key `rollout.sampling.temperature`" in error_of(p) and "(value: -1.0)" in error_of(p)


def test_bad_files_and_override_syntax(tmp_path):
    assert "config file not found" in error_of(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("learner: {lr: 1\n")
    assert f"{p}: not valid YAML" in error_of(p)
    p.write_text("- a\n- b\n")
    assert "the top level must be a mapping, got list" in error_of(p)
    p.write_text("")
    assert load_config(p) == msgspec.convert({}, Config)  # an empty file: all defaults
    assert "must look like key.path=value" in error_of(overrides=["learner.lr"])
    assert "empty key in the path" in error_of(overrides=["learner..lr=1"])
    assert "`stage` is not a section" in error_of(overrides=["stage.x=1"])
    assert "not a YAML value" in error_of(overrides=["learner.schedule=[1"])


def test_learner_ranks_need_fsdp():
    msg = error_of(overrides=["learner.num_workers=2"])
    assert "at key `learner`" in msg and "learner ranks need fsdp: true" in msg, msg
    assert load_config(None, ["learner.num_workers=2", "learner.fsdp=true"]).learner.num_workers == 2
