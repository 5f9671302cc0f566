"""Config: YAML defaults, --set overrides, refusal of unknown keys and wrong types."""

from __future__ import annotations

import pytest
import yaml

from ptxseg.config import (
    BUILTIN_DIR,
    Config,
    builtin_configs,
    config_keys,
    describe_keys,
    load_config,
    parse_override,
    resolve_config_path,
    save_config,
)
from ptxseg.errors import ConfigError
from ptxseg.run import Run


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
    with pytest.raises(ConfigError, match="no built-in config of that name"):
        load_config("nonexistent-name")
    with pytest.raises(ConfigError, match="missing"):
        Run(tmp_path).config()


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("paper", ["train.epochs=5", "model.encoder_weights=null"])
    save_config(cfg, tmp_path / "config.yaml")
    again = Run(tmp_path).config()
    assert again == cfg
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------
# built-in names vs files (issue 10, item 1)


def test_a_folder_named_like_a_builtin_does_not_hide_it(tmp_path, monkeypatch):
    """After `make demo` the project root holds demo/: `--config demo` is still the built-in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "run").mkdir(parents=True)
    (tmp_path / "paper").write_text("train:\n  epochs: 7\n")  # a file named like one too
    assert resolve_config_path("demo") == BUILTIN_DIR / "demo.yaml"
    assert load_config("demo") == load_config(BUILTIN_DIR / "demo.yaml")
    assert load_config("paper").train.epochs == 300  # the built-in, not ./paper
    assert load_config("./paper").train.epochs == 7  # a path names the file


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("./demo", "demo: is a folder, not a config file"),
        ("demo/", "demo: is a folder, not a config file"),
        ("sub/missing", "sub/missing: config file not found"),
        ("missing.yml", "missing.yml: config file not found"),
        ("papr", "papr: no built-in config of that name (built-in: demo, paper;"),
    ],
)
def test_paths_are_files_and_names_are_builtins(tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    with pytest.raises(ConfigError) as exc:
        load_config(value)
    assert str(exc.value).startswith(message)


def test_an_unknown_name_that_is_a_file_points_at_dot_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("train:\n  epochs: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config("mine")
    assert "no built-in config of that name" in str(exc.value)
    assert str(exc.value).endswith("to read the file 'mine' in this folder, use ./mine")
    assert load_config("./mine").train.epochs == 5


# ------------------------------------------------------------------------------------------
# key suggestions, descriptions, cross-key rules (items 8, 20)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=2", "unknown key 'train.epoch' (did you mean train.epochs?)"),
        ("model.encoder_weight=x", "unknown key 'model.encoder_weight' (did you mean "
                                   "model.encoder_weights?)"),
        ("trian.epochs=2", "unknown key 'trian' (did you mean train?)"),
    ],
)  # fmt: skip
def test_unknown_keys_suggest_the_closest_known_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("paper", [override])
    assert str(exc.value).endswith(message)


def test_a_key_far_from_any_other_gets_no_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_config("paper", ["train.bogus=1"])
    assert str(exc.value).endswith("unknown key 'train.bogus'")


def test_every_key_has_a_description_and_its_value():
    cfg = load_config("demo")
    infos = describe_keys(cfg)
    keys = [i.key for i in infos]
    # every leaf key of the model, once, in declaration order
    expected = [f"{s}.{k}" for s, f in Config.model_fields.items()
                for k in f.annotation.model_fields]  # fmt: skip
    assert keys == expected == config_keys()
    for info in infos:
        assert len(info.description) > 15, info.key
        section, name = info.key.split(".")
        assert info.value == getattr(getattr(cfg, section), name)
    by_key = {i.key: i for i in infos}
    assert by_key["data.size"].value == 128  # demo.yaml's, not the default
    assert by_key["data.layout"].choices == ("auto", "png", "siim", "ptx498", "csv")
    assert "not used" in by_key["model.encoder_weights"].description
    assert "init_from" in by_key["model.encoder_weights"].description


def test_both_loss_weights_zero_is_refused_naming_both_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config("paper", ["loss.bce_weight=0", "loss.dice_weight=0"])
    msg = str(exc.value)
    assert "loss.bce_weight and loss.dice_weight are both 0" in msg and "\n" not in msg
    p = tmp_path / "zero.yaml"
    p.write_text("loss:\n  bce_weight: 0\n  dice_weight: 0.0\n")
    with pytest.raises(ConfigError, match=r"zero.yaml: loss.bce_weight and loss.dice_weight"):
        load_config(p)
    assert load_config("paper", ["loss.bce_weight=0"]).loss.dice_weight == 1.0  # one is fine


def test_saved_config_header_is_a_comment(tmp_path):
    cfg = load_config("paper", ["train.epochs=5"])
    save_config(cfg, tmp_path / "config.yaml", header="extended at epoch 3\nsecond line")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# extended at epoch 3\n# second line\n")
    assert Run(tmp_path).config() == cfg
