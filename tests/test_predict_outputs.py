"""Output paths of `ptxseg predict` and `ptxseg export`: checked before any work, never one of
the command's inputs, never someone else's file without --overwrite; --out is locked while a
predict runs, and predicting again into it replaces the previous predict's outputs only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ptxseg.predict as predict_mod
from ptxseg.outputs import LOCK_NAME
from ptxseg.postprocess import PostParams
from tests.conftest import make_run
from tests.test_predict import SIZE, read_rows, run_cli
from tests.test_reliability_files import _image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run


@pytest.fixture
def images(tmp_path) -> Path:
    src = tmp_path / "in"
    for i, name in enumerate(("a", "b", "c")):
        _image(src / f"{name}.png", seed=i)
    return src


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if predict gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the output paths were not checked first")

    class Refusing:
        from_run = staticmethod(refuse)

    monkeypatch.setattr(predict_mod, "Predictor", Refusing)


def _one_error(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert ".tmp" not in lines[0]  # the user's path, never a temporary file
    return lines[0].removeprefix("error: ")


# --------------------------------------------------------------------------------- item 13


def test_a_kaggle_csv_that_is_an_input_is_refused(run, images, tmp_path, no_model):
    victim = images / "a.png"
    before = victim.read_bytes()
    rc, _, err = run_cli(["predict", str(run), str(victim), str(images / "b.png"),
                          "--out", str(tmp_path / "o"), "--kaggle-csv", str(victim)])
    assert _one_error(rc, err) == (
        f"{victim}: --kaggle-csv is one of this command's inputs; refusing to overwrite it"
    )
    assert victim.read_bytes() == before and not (tmp_path / "o").exists()
    # the same through a symlink, and the run's own thresholds.json
    os.symlink(victim, tmp_path / "link.csv")
    for target in (tmp_path / "link.csv", run / "thresholds.json"):
        rc, _, err = run_cli(["predict", str(run), str(victim), "--out", str(tmp_path / "o"),
                              "--kaggle-csv", str(target), "--overwrite"])
        assert "is one of this command's inputs" in _one_error(rc, err)
    assert victim.read_bytes() == before


def test_a_kaggle_csv_inside_an_input_folder_is_refused(run, images, tmp_path, no_model):
    """The dataset's ground truth has the submission's very header: only its place tells."""
    truth = images / "train-rle.csv"
    truth.write_text("ImageId,EncodedPixels\na,1 2\n")
    rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(tmp_path / "o"),
                          "--kaggle-csv", str(truth)])
    assert _one_error(rc, err) == (
        f"{truth}: --kaggle-csv lies inside the input folder {images.resolve()}; write it "
        "elsewhere (e.g. into --out)"
    )
    assert truth.read_text() == "ImageId,EncodedPixels\na,1 2\n"


def test_an_existing_file_is_replaced_only_when_it_is_a_submission(run, images, tmp_path):
    other = tmp_path / "notes.csv"
    other.write_text("my,notes\n")
    argv = ["predict", str(run), str(images), "--out", str(tmp_path / "o"), "--no-overlays"]
    rc, _, err = run_cli([*argv, "--kaggle-csv", str(other)])
    assert _one_error(rc, err) == (
        f"{other}: exists and is not a submission CSV (first line ImageId,EncodedPixels); "
        "refusing to replace it (--overwrite to replace it)"
    )
    assert other.read_text() == "my,notes\n"
    assert run_cli([*argv, "--kaggle-csv", str(other), "--overwrite"])[0] == 0
    assert other.read_text().startswith("ImageId,EncodedPixels\n")
    sub = tmp_path / "sub.csv"
    assert run_cli([*argv, "--kaggle-csv", str(sub)])[0] == 0
    sub.write_text(sub.read_text() + "stale,row\n")
    assert run_cli([*argv, "--kaggle-csv", str(sub)])[0] == 0  # a submission: replaced
    assert "stale" not in sub.read_text() and len(sub.read_text().splitlines()) == 4


# --------------------------------------------------------------------------------- item 18


def test_output_paths_are_checked_before_any_work(run, images, tmp_path, no_model):
    out = tmp_path / "o"
    folder = tmp_path / "sub.csv"
    folder.mkdir()
    cases = {
        str(folder): f"{folder}: --kaggle-csv must be a file path, but it is a folder",
        str(tmp_path / "nowhere" / "s.csv"): (
            f"{tmp_path / 'nowhere' / 's.csv'}: --kaggle-csv: the folder "
            f"{tmp_path / 'nowhere'} does not exist"
        ),
    }
    for kaggle, message in cases.items():
        rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(out),
                              "--kaggle-csv", kaggle])
        assert _one_error(rc, err) == message
        assert not out.exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(afile)])
    assert _one_error(rc, err) == f"{afile}: --out must be a folder, but it is a file"
    assert afile.read_text() == "x"


# --------------------------------------------------------------------------------- item 22


def test_a_second_predict_into_a_locked_out_is_refused(run, images, tmp_path):
    from ptxseg.fileio import folder_lock

    out = tmp_path / "o"
    out.mkdir()
    with folder_lock(out, LOCK_NAME):  # as a predict running in this process
        rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(out)])
        assert _one_error(rc, err) == (
            f"{out}: is in use by another ptxseg predict (pid {os.getpid()})"
        )
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing else written
    rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(out)])
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["masks", "overlays", "predict.json", "results.csv"]


def test_two_processes_predicting_into_one_out(run, images, tmp_path):
    """A real second process: while the first holds the lock (paused inside its run), the
    second is refused naming the first's pid; the first's outputs are consistent."""
    import multiprocessing

    out = tmp_path / "o"
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()

    def first() -> None:
        real = predict_mod.run_prediction

        def paused(*args, **kwargs):
            started.set()
            release.wait(120)
            return real(*args, **kwargs)

        predict_mod.run_prediction = paused
        os._exit(run_cli(["predict", str(run), str(images), "--out", str(out),
                          "--workers", "0"])[0])

    proc = ctx.Process(target=first)
    proc.start()
    try:
        assert started.wait(120), "the first predict did not start"
        rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(out)])
        assert _one_error(rc, err) == (
            f"{out}: is in use by another ptxseg predict (pid {proc.pid})"
        )
    finally:
        release.set()
        proc.join(120)
    assert proc.exitcode == 0
    rows = read_rows(out / "results.csv")
    assert sorted(os.listdir(out / "masks")) == sorted(f"{r['id']}.png" for r in rows)
    assert len(rows) == 3


# --------------------------------------------------------------------------------- item 23


def test_predicting_again_into_out_replaces_the_previous_outputs_only(run, images, tmp_path):
    out = tmp_path / "o"
    assert run_cli(["predict", str(run), str(images), "--out", str(out)])[0] == 0
    (out / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    _image(other / "d.png", seed=9)
    assert run_cli(["predict", str(run), str(other), "--out", str(out)])[0] == 0
    assert [r["id"] for r in read_rows(out / "results.csv")] == ["d"]
    assert os.listdir(out / "masks") == ["d.png"] and os.listdir(out / "overlays") == ["d.png"]
    assert (out / "notes.txt").read_text() == "mine"  # not a predict output: kept
    info = json.loads((out / "predict.json").read_text())
    assert info["ids"] == ["d"] and info["status"] == "done"


def test_an_interrupted_predict_is_cleared_by_the_next(run, images, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = predict_mod.finish
    calls = []

    def dies_on_the_second(item, probs, post):
        calls.append(item.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(item, probs, post)

    monkeypatch.setattr(predict_mod, "finish", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        predict_mod.predict(run, [images], out, workers=0, batch_size=1, progress=False)
    info = json.loads((out / "predict.json").read_text())
    assert info["status"] == "running" and info["ids"] == ["a", "b", "c"]
    written = set(os.listdir(out / "masks"))  # c may be written while b fails in the pool
    assert "a.png" in written and "b.png" not in written and not (out / "results.csv").exists()
    monkeypatch.setattr(predict_mod, "finish", real)
    other = tmp_path / "other"
    _image(other / "d.png")
    predict_mod.predict(run, [other], out, workers=0, progress=False)
    assert os.listdir(out / "masks") == ["d.png"]
    assert [r["id"] for r in read_rows(out / "results.csv")] == ["d"]


def test_files_in_out_that_ptxseg_did_not_write_need_overwrite(run, images, tmp_path):
    out = tmp_path / "o"
    (out / "masks").mkdir(parents=True)
    mine = np.full((4, 4), 7, np.uint8).tobytes()
    (out / "masks" / "b.png").write_bytes(mine)
    (out / "masks" / "keep.png").write_bytes(mine)
    rc, _, err = run_cli(["predict", str(run), str(images), "--out", str(out)])
    assert _one_error(rc, err) == (
        f"{out}: 1 file this run would write already exists and was not written by a "
        f"previous ptxseg predict (e.g. {out / 'masks' / 'b.png'}); choose another --out, "
        "or --overwrite to replace them"
    )
    assert (out / "masks" / "b.png").read_bytes() == mine
    assert run_cli(["predict", str(run), str(images), "--out", str(out), "--overwrite"])[0] == 0
    assert (out / "masks" / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "masks" / "keep.png").read_bytes() == mine


def test_outputs_of_out_that_are_inputs_are_refused(run, images, tmp_path, no_model):
    out = tmp_path / "o"
    (out / "masks").mkdir(parents=True)
    shutil.copy(images / "a.png", out / "masks" / "a.png")
    rc, _, err = run_cli(["predict", str(run), str(out / "masks" / "a.png"), "--out", str(out)])
    assert _one_error(rc, err) == (
        f"{out / 'masks' / 'a.png'}: is one of this command's inputs and --out {out} would "
        "replace it; choose another --out"
    )


def test_a_previous_predicts_outputs_used_as_inputs_are_not_cleared(run, images, tmp_path):
    out = tmp_path / "o"
    assert run_cli(["predict", str(run), str(images), "--out", str(out)])[0] == 0
    rc, _, err = run_cli(["predict", str(run), str(out / "overlays"), "--out", str(out)])
    assert "is one of this command's inputs and --out" in _one_error(rc, err)  # rewritten
    # not rewritten without overlays, but clearing the previous run's would delete it
    argv = ["predict", str(run), str(out / "overlays" / "b.png"), "--out", str(out)]
    rc, _, err = run_cli([*argv, "--no-overlays", "--overwrite"])
    assert _one_error(rc, err) == (
        f"{out / 'overlays' / 'b.png'}: an output of the previous predict into {out} is now an "
        "input; choose another --out"
    )
    assert sorted(os.listdir(out / "overlays")) == ["a.png", "b.png", "c.png"]


# --------------------------------------------------------------------------------- export


@pytest.fixture
def no_export(monkeypatch):
    import ptxseg.export as export_mod

    def refuse(*args, **kwargs):
        raise AssertionError("exported: --out was not checked first")

    monkeypatch.setattr(export_mod, "export_model", refuse)


def test_export_refuses_its_inputs_folders_and_foreign_files(run, tmp_path, no_export):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"\x89PNG not a model")
    rc, _, err = run_cli(["export", str(run), "--out", str(victim)])
    assert _one_error(rc, err) == (
        f"{victim}: exists and is not a ptxseg ONNX export; refusing to replace it "
        "(--overwrite to replace it)"
    )
    assert victim.read_bytes() == b"\x89PNG not a model"
    rc, _, err = run_cli(["export", str(run), "--out", str(tmp_path)])
    assert _one_error(rc, err) == f"{tmp_path}: --out must be a file path, but it is a folder"
    ckpt = run / "best.ckpt"
    before = ckpt.read_bytes()
    rc, _, err = run_cli(["export", str(run), "--out", str(ckpt), "--overwrite"])
    assert _one_error(rc, err) == (
        f"{ckpt}: --out is one of the export's inputs; refusing to overwrite it"
    )
    assert ckpt.read_bytes() == before


def test_export_replaces_a_ptxseg_export_or_with_overwrite(run, tmp_path):
    import onnx

    target = tmp_path / "model.onnx"
    target.write_text("not onnx")
    rc, _, err = run_cli(["export", str(run), "--out", str(target), "--overwrite"])
    assert rc == 0, err
    first = target.stat().st_mtime_ns
    rc, _, err = run_cli(["export", str(run), "--out", str(target)])  # its own kind: replaced
    assert rc == 0, err
    assert target.stat().st_mtime_ns >= first
    meta = {p.key for p in onnx.load(str(target)).metadata_props}
    assert "ptxseg.input_size" in meta


def test_a_run_that_fails_to_load_its_model_leaves_no_new_out(run, images, tmp_path):
    """--out is created (and locked) before the model is loaded: a failure there removes it."""
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(run / "config.yaml", bad / "config.yaml")
    (bad / "best.ckpt").write_bytes((run / "best.ckpt").read_bytes()[:1000])
    out = tmp_path / "new" / "out"
    rc, _, err = run_cli(["predict", str(bad), str(images), "--out", str(out)])
    assert "truncated or not a checkpoint" in _one_error(rc, err)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ issue 26, items 24 and 16


def _files(folder: Path) -> set[str]:
    return {(Path(r) / n).relative_to(folder).as_posix()
            for r, _, names in os.walk(folder) for n in names}  # fmt: skip


def _by_folder(names) -> str:
    """The note's grouping, computed here: counts per top folder, then top-level names."""
    from collections import Counter

    tops = Counter(n.split("/")[0] for n in names if "/" in n)
    return ", ".join([f"{k} in {f}/" for f, k in sorted(tops.items())]
                     + sorted(n for n in names if "/" not in n))  # fmt: skip


def test_predicting_again_says_what_it_replaced_and_leaves_nothing_stale(
        run, sample_dir, tmp_path):
    """A first predict writes DICOM SEGs and a submission into --out; a second one without
    either removes both (the old submission.csv no longer lies beside the new results.csv)
    and says so in one line with counts, computed here from the folder's listings."""
    src = tmp_path / "in"
    src.mkdir()
    for dicom in sorted((sample_dir / "dicom").glob("*.dcm"))[:3]:
        shutil.copy(dicom, src / dicom.name)
    out = tmp_path / "o"
    rc, _, err = run_cli(["predict", str(run), str(src), "--out", str(out), "--dicom-seg",
                          "--kaggle-csv", str(out / "submission.csv")])
    assert rc == 0, err
    assert "replaced" not in err  # nothing to replace the first time
    before = _files(out)
    assert len([n for n in before if n.startswith("dicom_seg/")]) == 3
    rc, _, err = run_cli(["predict", str(run), str(src), "--out", str(out)])
    assert rc == 0, err
    after = _files(out)
    assert not (out / "submission.csv").exists() and not (out / "dicom_seg").exists()
    again = sorted((before & after) - {"predict.json"})
    gone = sorted(before - after)
    assert gone == sorted([n for n in before if n.startswith("dicom_seg/")] + ["submission.csv"])
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {out}: the previous predict's outputs were replaced: {len(again)} files written "
        f"again ({_by_folder(again)}) and {len(gone)} removed, not written by this run "
        f"({_by_folder(gone)})"
    ]
    assert _by_folder(gone) == "3 in dicom_seg/, submission.csv"
    info = json.loads((out / "predict.json").read_text())
    assert info["kaggle_csv"] is None and info["dicom_seg"] is False


def test_the_summary_counts_what_results_csv_holds(run, sample_dir, tmp_path):
    """An unreadable file (no mask) and a DICOM whose SEG cannot be made (a mask, no SEG): the
    summary's counts are those of results.csv's rows, read back here."""
    from tests.conftest import write_dicom

    src = tmp_path / "in"
    for i in range(2):
        _image(src / f"p{i}.png", seed=i)
    (src / "bad.png").write_bytes(b"not a png")
    write_dicom(src / "nouid.dcm", np.full((80, 80), 120, np.uint8))  # no Study/Series UID
    out = tmp_path / "o"
    rc, stdout, err = run_cli(["predict", str(run), str(src), "--out", str(out),
                               "--dicom-seg"])
    assert rc == 2
    rows = read_rows(out / "results.csv")
    predicted = [r for r in rows if r["has_pneumothorax"] != ""]
    positive = [r for r in predicted if r["has_pneumothorax"] == "1"]
    failed = [r for r in rows if r["status"] != "ok"]
    unreadable = [r for r in failed if r["has_pneumothorax"] == ""]
    assert (len(rows), len(predicted), len(failed), len(unreadable)) == (4, 3, 2, 1)
    assert f"{len(predicted)} images predicted, {len(positive)} with pneumothorax (" in stdout
    assert err.strip().splitlines()[-1] == (
        f"error: {len(failed)} of {len(rows)} files failed: {len(unreadable)} not predicted "
        f"(unreadable), {len(failed) - len(unreadable)} predicted without a DICOM SEG; see the "
        f"status column of {out / 'results.csv'}"
    )
    info = json.loads((out / "predict.json").read_text())
    assert (info["images"], info["predicted"], info["positive"], info["errors"]) == (
        len(rows), len(predicted), len(positive), len(failed))
