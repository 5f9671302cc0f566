"""The run folder's one owner: its file names are spelled in ptxseg.run only, its thresholds
follow one rule, and a checkpoint copied alone into an empty folder still predicts."""

from __future__ import annotations

import ast
import csv
import re
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch

from ptxseg.errors import DataError
from ptxseg.postprocess import DEFAULT_PARAMS, PostParams, save_params
from ptxseg.run import BEST, CONFIG, CURVES, DATA, LAST, METRICS, ONNX, SPLIT, THRESHOLDS, Run
from tests.conftest import REPO
from tests.test_predict import run_cli

RUN_FILES = (CONFIG, SPLIT, DATA, BEST, LAST, METRICS, CURVES, THRESHOLDS, ONNX)


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal of a module (f-string parts included) that is not a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_the_run_files_are_spelled_in_ptxseg_run_only():
    """No string in the code (docstrings aside) names a run file but ptxseg/run.py's
    constants: every module asks Run for its paths."""
    assert RUN_FILES == ("config.yaml", "split.csv", "data.json", "best.ckpt", "last.ckpt",
                         "metrics.csv", "curves.png", "thresholds.json", "model.onnx")  # fmt: skip
    found = []
    for path in sorted((REPO / "src" / "ptxseg").rglob("*.py")) + sorted(
        (REPO / "benchmarks").glob("*.py")
    ):
        if path == REPO / "src" / "ptxseg" / "run.py":
            continue
        for line, text in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            found += [f"{path.relative_to(REPO)}:{line}: {name}" for name in RUN_FILES
                      if re.search(rf"(?<![\w.-]){re.escape(name)}", text)]  # fmt: skip
    assert not found, "\n".join(found)
    assert _string_constants(ast.parse('"""best.ckpt"""\nx = f"{y}/best.ckpt"\n')) != [], (
        "the scan finds f-string parts"
    )


def test_thresholds_one_rule(tmp_path):
    """--thresholds FILE (must exist), else RUN/thresholds.json, else the default rule with
    one warning; a file that does not say its size gets the model's."""
    run = Run(tmp_path / "run")
    run.path.mkdir()
    with pytest.warns(UserWarning) as caught:
        default = run.thresholds(size=64)
    assert (default.params, default.path, default.source) == (DEFAULT_PARAMS, None, "default")
    assert DEFAULT_PARAMS == PostParams(binary_threshold=0.5, removal_area=0)
    assert [str(w.message) for w in caught] == [
        f"{run.path / 'thresholds.json'} not found: using the default rule probs > 0.5, no "
        f"component removal (run `ptxseg tune {run.path}` to choose them)"
    ]
    with pytest.raises(DataError, match="thresholds file not found"):
        run.thresholds(tmp_path / "nope.json")
    tuned = PostParams(binary_threshold=0.3, removal_area=16, size=128)
    save_params(tuned, run.path / "thresholds.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tuned run: no warning
        got = run.thresholds(size=64)
    assert (got.params, got.source) == (tuned, str(run.path / "thresholds.json"))
    (tmp_path / "hand.json").write_text('{"binary_threshold": 0.7, "removal_area": 5}')
    hand = run.thresholds(tmp_path / "hand.json", size=64)
    assert hand.params == PostParams(binary_threshold=0.7, removal_area=5, size=64)


def test_a_checkpoint_alone_in_an_empty_folder_predicts(tiny_run, tmp_path, sample_dir):
    """best.ckpt copied alone (no config.yaml, no split, no thresholds) into an empty folder
    predicts with `predict --model`, the same masks as its run folder gives."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tiny_run / "best.ckpt", alone / "best.ckpt")
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    outs = {}
    for name, run, extra in (("alone", alone, ["--model", str(alone / "best.ckpt")]),
                             ("run", tiny_run, [])):  # fmt: skip
        outs[name] = tmp_path / f"out-{name}"
        rc, _, err = run_cli(["predict", str(run), str(png), "--out", str(outs[name]),
                              "--workers", "0", *extra])  # fmt: skip
        assert rc == 0, err
        assert "thresholds.json not found" in err  # neither folder was tuned: default rule
    masks = {k: cv2.imread(str(v / "masks" / f"{png.stem}.png"), 0) for k, v in outs.items()}
    assert masks["alone"] is not None and np.array_equal(masks["alone"], masks["run"])
    rows = {k: list(csv.DictReader(open(v / "results.csv"))) for k, v in outs.items()}
    assert rows["alone"][0]["max_prob"] == rows["run"][0]["max_prob"]
    assert sorted(p.name for p in alone.iterdir()) == ["best.ckpt"]  # nothing written there


def test_a_checkpoint_of_an_older_ptxseg_needs_its_run_config(tiny_run, tmp_path):
    """Weights only (no description): loads from its run folder (config.yaml), and alone it is
    refused with a message that says what is missing."""
    from ptxseg.checkpoint import load_checkpoint

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tiny_run / "config.yaml", old / "config.yaml")
    obj = torch.load(tiny_run / "best.ckpt", map_location="cpu", weights_only=True)
    torch.save({"state_dict": obj["state_dict"]}, old / "best.ckpt")
    model, info = Run(old).load_model()
    assert not info.embedded and info.size == 64
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    (old / "config.yaml").unlink()
    with pytest.raises(Exception, match="config.yaml: missing"):
        Run(old).load_model()
    with pytest.raises(Exception, match="does not describe its model"):
        load_checkpoint(old / "best.ckpt")
