"""The command line's help and choices (issue 10, item 8): enumerated options list their
values in --help and refuse others, flags show no value, misspelt config keys get a
suggestion, and ``ptxseg config show`` lists every key with its value and meaning."""

from __future__ import annotations

import re

import pytest
import yaml

from ptxseg.cli import app, main
from ptxseg.config import BUILTIN_DIR, describe_keys, load_config

CHOICES = {  # command: {option: the values --help must list}
    "tune": {"--objective": "iou|kaggle", "--mode": "pixel|triplet", "--tta": "none|hflip",
             "--layout": "auto|png|siim|ptx498|csv", "--backend": "torch|onnx",
             "--device": "auto|cpu|cuda|mps", "--grid": "default|wide"},
    "evaluate": {"--at": "native|model", "--split": "all|val|train", "--tta": "none|hflip",
                 "--backend": "torch|onnx", "--device": "auto|cpu|cuda|mps"},
    "predict": {"--backend": "torch|onnx", "--device": "auto|cpu|cuda|mps", "--tta": "none|hflip",
                "--overlay-style": "fill|outline"},
    "train": {"--layout": "auto|png|siim|ptx498|csv"},
    "inspect": {"--layout": "auto|png|siim|ptx498|csv"},
}  # fmt: skip


def _help(capsys, *args: str) -> str:
    assert main([*args, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(CHOICES))
def test_help_lists_the_choices(capsys, command):
    text = _help(capsys, command)
    for option, values in CHOICES[command].items():
        assert re.search(rf"^\s+{option} <{re.escape(values)}>", text, re.M), (option, text)


def test_choices_come_from_the_modules_that_own_them():
    """Every enumerated option is typed with the Choice class of the module that owns it (the
    same class object, not a copy), so the CLI cannot drift from the library."""
    import typing

    from ptxseg.data.sources import Layout
    from ptxseg.evaluate import At
    from ptxseg.hardware import Device
    from ptxseg.overlays import OverlayStyle
    from ptxseg.postprocess import Mode
    from ptxseg.predictor import Backend
    from ptxseg.run import Split
    from ptxseg.tta import Tta
    from ptxseg.tune import Grid, Objective

    owners = {"layout": Layout, "at": At, "device": Device, "mode": Mode, "backend": Backend,
              "split": Split, "tta": Tta, "objective": Objective,
              "overlay_style": OverlayStyle, "grid": Grid}  # fmt: skip
    seen = set()
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        for name, owner in owners.items():
            if name in hints:
                base = typing.get_args(hints[name])[0]
                assert owner in (base, *typing.get_args(base)), (command.name, name, base)
                seen.add(name)
    assert seen == set(owners)


def test_the_command_line_imports_no_torch():
    """``ptxseg --help`` stays fast: building the app (every choice list included) loads no
    torch (it takes seconds)."""
    import subprocess
    import sys

    code = "import sys, ptxseg.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_no_help_shows_a_type_for_a_flag(capsys):
    commands = [name for name in (c.name for c in app.registered_commands)] + ["config show"]
    assert len(commands) >= 10
    for command in [None, *commands]:
        text = _help(capsys, *(command.split() if command else []))
        assert "<bool>" not in text, command
    assert re.search(r"^\s+--json\s+Machine-readable output\.", _help(capsys, "inspect"), re.M)


def _command_paths() -> list[list[str]]:
    """Every command and command group of the CLI, as argv ([] is ``ptxseg`` itself)."""
    import typer

    paths, stack = [], [([], typer.main.get_command(app))]
    while stack:
        path, command = stack.pop()
        paths.append(path)
        stack += [([*path, name], sub) for name, sub in getattr(command, "commands", {}).items()]
    return sorted(paths)


def test_help_shows_metavars_not_python_types(capsys):
    """No --help shows a Python type (``--set <list[str]>``, ``--model <list[Path]>``,
    ``<path>``, ``<int range>``) or typer's braces (``{run}``): every value has a metavar
    (``--set KEY=VALUE``, ``--model MODEL``, ``RUN``); choices list their values."""
    paths = _command_paths()
    assert ["config", "show"] in paths and len(paths) >= 13
    python = re.compile(r"list\[|Path\]|\{|\}|<class|<(path|int|float|str|text|bool|dict)\b"
                        r"|range>")  # fmt: skip
    for path in paths:
        text = _help(capsys, *path)
        bad = [line for line in text.splitlines() if python.search(line)]
        assert not bad, (path, bad)
        usage = text.splitlines()[0]
        assert re.fullmatch(r"Usage: ptxseg( [a-z-]+)* \[OPTIONS\]( \[?[A-Z|.]+\]?)*"
                            r"( COMMAND \[ARGS\]\.\.\.)?", usage), usage  # fmt: skip
    text = _help(capsys, "predict")
    assert text.splitlines()[0] == "Usage: ptxseg predict [OPTIONS] RUN INPUT..."
    for option, metavar in (("--model", "MODEL"), ("--id-map", "CSV"), ("--out", "DIR"),
                            ("--workers", "N")):  # fmt: skip
        assert re.search(rf"^  {option} {re.escape(metavar)}  ", text, re.M), option
    assert re.search(r"^  RUN  +Run folder", text, re.M)
    assert re.search(r"^  --set KEY=VALUE  ", _help(capsys, "train"), re.M)
    assert re.search(r"^  --out FILE  +ONNX file", _help(capsys, "export"), re.M)


def test_an_unknown_device_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(tmp_path), str(tmp_path), "--out", str(out), "--device", "tpu"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --device: unknown 'tpu' (valid: auto, cpu, cuda, mps)\n"
    assert not out.exists()
    from ptxseg.errors import PtxsegError
    from ptxseg.hardware import resolve_device

    with pytest.raises(PtxsegError) as exc:  # the library says what the command line says
        resolve_device("tpu")
    assert str(exc.value) == "--device: unknown 'tpu' (valid: auto, cpu, cuda, mps)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "R", "--data", "D", "--out", "O", "--at", "paper"],
         "--at: unknown 'paper' (valid: native, model)"),
        (["evaluate", "R", "--data", "D", "--out", "O", "--split", "test"],
         "--split: unknown 'test' (valid: all, val, train)"),
        (["tune", "R", "--objective", "dice"], "--objective: unknown 'dice' (valid: iou, kaggle)"),
        (["tune", "R", "--mode", "pixels"], "--mode: unknown 'pixels' (valid: pixel, triplet)"),
        (["predict", "R", "I", "--out", "O", "--backend", "tensorrt"],
         "--backend: unknown 'tensorrt' (valid: torch, onnx)"),
        (["inspect", "D", "--layout", "dicom"],
         "--layout: unknown 'dicom' (valid: auto, png, siim, ptx498, csv)"),
    ],
)  # fmt: skip
def test_other_bad_choices_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_key_suggests_the_right_one(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--set", "train.epoch=2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().endswith("unknown key 'train.epoch' (did you mean train.epochs?)")
    assert len(err.strip().splitlines()) == 1


def test_config_show_prints_every_key_with_value_and_description(capsys):
    assert main(["config", "show", "demo", "--set", "train.epochs=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# demo: {BUILTIN_DIR / 'demo.yaml'} (with --set)"
    cfg = load_config("demo", ["train.epochs=3"])
    infos = describe_keys(cfg)
    assert len(lines) == 1 + len(infos)
    for line, info in zip(lines[1:], infos, strict=True):
        key, value, description = re.split(r"\s{2,}", line, maxsplit=2)
        assert key == info.key
        assert yaml.safe_load(value) == info.value
        assert description.startswith(info.description)
    shown = dict(re.split(r"\s{2,}", line, maxsplit=2)[:2] for line in lines[1:])
    assert shown["train.epochs"] == "3" and shown["data.size"] == "128"
    assert shown["model.encoder_weights"] == "null"


def test_config_show_yaml_round_trips(tmp_path, capsys):
    assert main(["config", "show", "--yaml", "--set", "optim.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert load_config(path) == load_config("paper", ["optim.lr=3e-4"])
    assert main(["config", "show", "nope"]) == 2
    assert "nope: no built-in config of that name" in capsys.readouterr().err


def test_version(capsys):
    from ptxseg import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ptxseg {__version__}\n"
