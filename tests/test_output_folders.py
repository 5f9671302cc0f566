"""The one output-folder rule (issue 26, item 6) in the commands that write a folder other than
predict's (tests/test_predict_outputs.py): evaluate --out and synth OUT. Checked before any
work, locked, a previous run's files replaced and said, never anyone else's file without
--overwrite; a record edited to point outside the folder removes nothing there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ptxseg.cli import main
from ptxseg.postprocess import PostParams
from tests.conftest import make_run

SIZE = 64
METRICS_CSV = "epoch,train_loss,val_loss,val_iou,val_dice,lr,time_s\n1,0.9,0.8,0.1,0.2,0.001,1\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _files(folder: Path) -> set[str]:
    return {(Path(r) / n).relative_to(folder).as_posix()
            for r, _, names in os.walk(folder) for n in names}  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import ptxseg.predictor as predictor_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the output folder was not checked first")

    monkeypatch.setattr(predictor_mod.Predictor, "from_run", classmethod(refuse))


def test_evaluate_refuses_files_it_did_not_write(run, synth_data, tmp_path, capsys, no_model):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("report.html", "metrics.json", "per_image.csv"):
        (out / name).write_text(f"my {name}")
    code, _, err = _cli(capsys, "evaluate", run, "--data", synth_data, "--out", out)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {out}: 3 files this run would write already exist and were not written by a "
        f"previous ptxseg evaluate (e.g. {out / 'metrics.json'}); choose another --out, or "
        "--overwrite to replace them"
    ]
    assert sorted(_files(out)) == ["metrics.json", "per_image.csv", "report.html"]
    assert all((out / n).read_text() == f"my {n}" for n in _files(out))


def test_evaluating_again_replaces_the_previous_evaluation_and_says_so(
        run, synth_data, tmp_path, capsys):
    """--overwrite replaces a file of someone else's (keeping the others); evaluating again
    replaces the previous evaluation's files: a run with training curves, then one without,
    so the second removes the first one's training_curves.png and names it; an evaluation
    of an older ptxseg (no record) is known by its metrics.json; a record edited to name files
    outside the folder removes nothing there."""
    curves = tmp_path / "curves"
    make_run(curves, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    (curves / "metrics.csv").write_text(METRICS_CSV)
    out = tmp_path / "ev"
    out.mkdir()
    (out / "report.html").write_text("mine")
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "evaluate", curves, "--data", synth_data, "--out", out,
                        "--overwrite")  # fmt: skip
    assert code == 0, err
    assert "replaced" not in err
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    record = json.loads((out / ".ptxseg-evaluate.json").read_text())
    assert record["command"] == "evaluate" and record["status"] == "done"
    assert set(record["files"]) == _files(out) - {"notes.txt", ".ptxseg-evaluate.json"}

    (out / "overlays" / "mine.png").write_text("mine")
    before = _files(out)
    assert "training_curves.png" in before
    code, _, err = _cli(capsys, "evaluate", run, "--data", synth_data, "--out", out)
    assert code == 0, err
    after = _files(out)
    assert (out / "notes.txt").read_text() == (out / "overlays" / "mine.png").read_text() == "mine"
    gone = before - after
    again = (before & after) - {"notes.txt", "overlays/mine.png", ".ptxseg-evaluate.json"}
    assert gone == {"training_curves.png"}
    n_overlays = len([n for n in again if n.startswith("overlays/")])
    assert [line for line in err.splitlines() if line.startswith("note:")] == [
        f"note: {out}: the previous evaluate's outputs were replaced: {len(again)} files written "
        f"again ({n_overlays} in overlays/, confusion_matrix.png, metrics.json, per_image.csv, "
        "report.html) and 1 removed, not written by this run (training_curves.png)"
    ]

    # ptxseg before the rule wrote no record: its metrics.json says what it is
    (out / ".ptxseg-evaluate.json").unlink()
    code, _, err = _cli(capsys, "evaluate", run, "--data", synth_data, "--out", out)
    assert code == 0, err
    assert "the previous evaluate's outputs were replaced" in err

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".ptxseg-evaluate.json").write_text(json.dumps({
        "command": "evaluate", "files": ["../victim.txt", str(victim), "a/../../victim.txt"],
    }))  # fmt: skip
    (out / "metrics.json").write_text('{"my": "metrics"}')  # no longer an evaluation's
    code, _, err = _cli(capsys, "evaluate", run, "--data", synth_data, "--out", out)
    assert code == 2 and "were not written by a previous ptxseg evaluate" in err
    assert victim.read_text() == "precious" and (out / "metrics.json").exists()


def test_a_second_evaluate_into_a_locked_out_is_refused(run, synth_data, tmp_path, capsys,
                                                        no_model):
    from ptxseg.fileio import folder_lock

    out = tmp_path / "ev"
    out.mkdir()
    with folder_lock(out, ".ptxseg-evaluate.lock"):
        code, _, err = _cli(capsys, "evaluate", run, "--data", synth_data, "--out", out)
    assert code == 2 and err.strip() == (
        f"error: {out}: is in use by another ptxseg evaluate (pid {os.getpid()})"
    )
    assert os.listdir(out) == []


def test_evaluate_never_writes_over_its_inputs(run, synth_data, tmp_path, capsys, no_model):
    """--out inside the dataset, where an output has the name of one of its masks."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    first = sorted((data / "png_images").glob("*.png"))[0]
    for sub in ("png_images", "png_masks"):  # one pair renamed as an output of evaluate
        (data / sub / first.name).rename(data / sub / "confusion_matrix.png")
    mask = data / "png_masks" / "confusion_matrix.png"
    before = mask.read_bytes()
    code, _, err = _cli(capsys, "evaluate", run, "--data", data, "--out", data / "png_masks",
                        "--overwrite")  # fmt: skip
    assert code == 2 and err.strip() == (
        f"error: {mask}: is one of this command's inputs and --out {data / 'png_masks'} "
        "would replace it; choose another --out"
    )
    assert mask.read_bytes() == before


# ------------------------------------------------------------------------------------ synth


def test_synth_again_replaces_the_previous_dataset(tmp_path, capsys):
    """A smaller dataset into a previous synth's folder: none of the old images stays beside
    the new ones (it would join the dataset), and the line says how many were removed."""
    out = tmp_path / "s"
    assert _cli(capsys, "synth", out, "--n", "6", "--size", "32")[0] == 0
    code, _, err = _cli(capsys, "synth", out, "--n", "4", "--size", "32")
    assert code == 0, err
    assert sorted(p.name for p in (out / "png_images").iterdir()) == [
        f"synth_{i:04d}.png" for i in range(4)]
    assert [line for line in err.splitlines() if line.startswith("note:")] == [
        f"note: {out}: the previous synth's outputs were replaced: 8 files written again (4 in "
        "png_images/, 4 in png_masks/) and 4 removed, not written by this run (2 in "
        "png_images/, 2 in png_masks/)"
    ]


def test_synth_refuses_a_folder_with_other_files(tmp_path, capsys):
    out = tmp_path / "s"
    (out / "png_images").mkdir(parents=True)
    (out / "png_images" / "mine.png").write_text("mine")
    code, _, err = _cli(capsys, "synth", out, "--n", "2", "--size", "32")
    assert code == 2 and "not a previous ptxseg synth's" in err and "--overwrite" in err
    assert _files(out) == {"png_images/mine.png"}
    assert _cli(capsys, "synth", out, "--n", "2", "--size", "32", "--overwrite")[0] == 0
    assert (out / "png_images" / "mine.png").read_text() == "mine"


# ---------------------------------------------------------------------------------- prepare


def test_prepare_removes_its_own_leftover_but_never_a_folder_of_others(synth_data, tmp_path,
                                                                        capsys):
    """prepare builds its copy in .OUT.partial; an interrupted run's leftover is removed by
    the next, a folder of that name that prepare did not make is not."""
    out = tmp_path / "prep"
    theirs = tmp_path / ".prep.partial"
    theirs.mkdir()
    (theirs / "mine.txt").write_text("mine")
    code, _, err = _cli(capsys, "prepare", synth_data, out, "--size", "32")
    assert code == 2 and err.strip() == (
        f"error: {theirs}: exists and is not a partial copy left by ptxseg prepare; remove it "
        "or choose another output folder"
    )
    assert (theirs / "mine.txt").read_text() == "mine" and not out.exists()
    (theirs / "mine.txt").unlink()
    (theirs / ".ptxseg-prepare-partial").write_text("x")  # an interrupted prepare's
    (theirs / "png_images").mkdir()
    (theirs / "png_images" / "half.png").write_text("x")
    assert _cli(capsys, "prepare", synth_data, out, "--size", "32")[0] == 0
    assert not theirs.exists() and not (out / ".ptxseg-prepare-partial").exists()
    assert len(list((out / "png_images").iterdir())) == len(
        list((synth_data / "png_images").iterdir()))
