"""Config: YAML defaults, --set overrides, refusal of unknown keys and wrong types."""

from __future__ import annotations

import pytest
import yaml

from ptxseg.config import (
    BUILTIN_DIR,
    Config,
    builtin_configs,
    load_config,
    load_run_config,
    parse_override,
    save_config,
)
from ptxseg.errors import ConfigError


def test_paper_config_is_the_published_recipe():
    cfg = load_config("paper")
    assert cfg.model.arch == "unet" and cfg.model.encoder == "efficientnet-b4"
    assert cfg.model.encoder_weights == "imagenet"
    assert (cfg.loss.bce_weight, cfg.loss.dice_weight) == (1.0, 1.0)
    assert (cfg.optim.lr, cfg.optim.lr_min) == (1e-4, 1e-6)
    assert (cfg.data.size, cfg.train.batch_size) == (512, 32)
    assert (cfg.train.epochs, cfg.train.patience) == (300, 20)
    assert cfg.data.val_fraction == 0.15 and cfg.augment.enabled is True
    # paper.yaml spells out every key: nothing is left to a code default
    raw = yaml.safe_load((BUILTIN_DIR / "paper.yaml").read_text())
    assert set(raw) == set(Config.model_fields)
    for section, model in Config.model_fields.items():
        assert set(raw[section]) == set(model.annotation.model_fields), section


def test_builtin_names_and_paths_resolve(tmp_path):
    assert {"paper", "demo"} <= set(builtin_configs())
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n")
    assert load_config(p).train.epochs == 7
    assert load_config(p).train.batch_size == 32  # defaults fill the rest


def test_overrides_parse_yaml_values():
    cfg = load_config(
        "paper",
        ["train.epochs=3", "model.encoder_weights=null", "optim.lr=3e-4", "train.compile=false"],
    )
    assert cfg.train.epochs == 3 and cfg.model.encoder_weights is None
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.compile is False
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.foo=1", "unknown key 'train.foo'"),
        ("nosection.x=1", "unknown key 'nosection'"),
        ("train.epochs=abc", "'train.epochs': Input should be a valid integer"),
        ("data.size=100", "'data.size'"),
        ("train.precision=8", "'train.precision'"),
        ("epochs", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("paper", [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file or built-in config"):
        load_config("nonexistent-name")
    with pytest.raises(ConfigError, match="missing"):
        load_run_config(tmp_path)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("paper", ["train.epochs=5", "model.encoder_weights=null"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_run_config(tmp_path)
    assert again == cfg
    assert not list(tmp_path.glob(".*.tmp"))
