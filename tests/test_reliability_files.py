"""Odd files and names: a byte that is not UTF-8 in a file or folder name, a FIFO (also one
named by a manifest, and /dev/stdin fed by a pipe that never writes), a symlink loop.

Each works or is reported and the rest goes on; nothing crashes or blocks. The FIFO cases run
the CLI in a subprocess with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ptxseg.cli import main
from ptxseg.postprocess import PostParams
from tests.conftest import make_run, run_bounded, subprocess_env, tiny_config
from tests.test_predict import SIZE, read_rows, run_cli

BAD = os.fsdecode(b"bad\xff")  # a file name byte that is not UTF-8 (Linux keeps it as \udcff)
BAD_DIR = os.fsdecode(b"in\xfe")
TIMEOUT = 120  # generous on a loaded 2-core machine; a FIFO read would block forever
READ_TIMEOUT = 20  # in-process readers (no import cost)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (48, 40), dtype=np.uint8)
    path.write_bytes(cv2.imencode(".png", img)[1].tobytes())  # cv2.imwrite: not for such names
    return path


def _mask(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((48, 40), np.uint8)
    mask[10:20, 5:15] = 255
    path.write_bytes(cv2.imencode(".png", mask)[1].tobytes())
    return path


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """The CLI in its own process group, killed with its reading workers after ``TIMEOUT``."""
    env = subprocess_env(OMP_NUM_THREADS="1", COLUMNS="240")
    return run_bounded([sys.executable, "-m", "ptxseg", *args], TIMEOUT,
                       f"ptxseg {args[0]} (blocked on a FIFO?)", env=env, **kwargs)  # fmt: skip


# --------------------------------------------------------------------------------- item 12


def test_predict_names_that_are_not_utf8(run, tmp_path):
    src = tmp_path / BAD_DIR
    _image(src / f"{BAD}.png")
    _image(src / "ok.png", seed=1)
    out = tmp_path / os.fsdecode(b"out\xfd")
    rc, stdout, err = run_cli(["predict", str(run), str(src), "--out", str(out)])
    assert rc == 0, err
    text = (out / "results.csv").read_bytes().decode("utf-8")  # valid UTF-8
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["id"] for r in rows] == ["bad_xff", "ok"]
    assert rows[0]["source"] == str(tmp_path / "in\\xfe" / "bad\\xff.png")
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(os.listdir(out / "masks")) == ["bad_xff.png", "ok.png"]
    assert json.loads((out / "predict.json").read_text())["ids"] == ["bad_xff", "ok"]
    assert "out\\xfd/" in stdout  # shown escaped, not as a replacement character


def test_train_tune_evaluate_on_names_that_are_not_utf8(synth_data, tmp_path):
    from ptxseg.train import fit

    data = tmp_path / BAD_DIR
    shutil.copytree(synth_data, data)
    renamed = sorted((data / "png_images").iterdir())[0].name
    for sub in ("png_images", "png_masks"):
        (data / sub / renamed).rename(data / sub / f"{BAD}.png")
    run = tmp_path / "run"
    fit(tiny_config(**{"train.epochs": 1}), data, run, progress=False)
    split = {r["id"]: r for r in csv.DictReader(open(run / "split.csv", encoding="utf-8"))}
    assert "bad\\xff" in split and len(split) == 16
    recorded = json.loads((run / "data.json").read_text())["root"]
    assert Path(recorded) == data.resolve()  # lossless: tune finds the data without --data
    assert main(["tune", str(run)]) == 0
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    per_image = read_rows(tmp_path / "ev" / "per_image.csv")
    assert "bad\\xff" in [r["id"] for r in per_image] and len(per_image) == 16
    side = split["bad\\xff"]["split"]
    ev = tmp_path / f"ev-{side}"
    assert main(["evaluate", str(run), "--data", str(data), "--split", side, "--out", str(ev)]) == 0
    assert "bad\\xff" in [r["id"] for r in read_rows(ev / "per_image.csv")]


def test_a_run_whose_files_cannot_be_written_leaves_no_folder(synth_data, tmp_path, monkeypatch):
    """The run folder's first files are written inside the clean-up: a failure there leaves
    nothing that would block the same command from running again."""
    import ptxseg.data.split as split_mod
    from ptxseg.train import fit

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(split_mod, "write_split", fail)
    from ptxseg.errors import PtxsegError

    with pytest.raises(PtxsegError, match=r"split\.csv: disk full / could not write"):
        fit(tiny_config(**{"train.epochs": 1}), synth_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_messages_and_text_files_escape_bytes_that_are_not_utf8(tmp_path):
    from ptxseg.errors import one_line, printable
    from ptxseg.fileio import write_csv

    assert printable(f"a/{BAD}.png") == "a/bad\\xff.png"
    assert one_line(f"{BAD}\n") == "bad\\xff\\n"
    write_csv(tmp_path / "x.csv", ["id"], [[BAD]])
    assert (tmp_path / "x.csv").read_bytes() == b"id\nbad\\xff\n"


# --------------------------------------------------------------------------------- item 14


def test_fifos_are_reported_and_never_read(run, tmp_path):
    """A FIFO in an input folder (with an image suffix, and one named *.csv where the layout
    is detected), one named by a manifest, and /dev/stdin fed by a pipe nobody writes to."""
    src = tmp_path / "in"
    _image(src / "a.png")
    os.mkfifo(src / "pipe.png")
    os.mkfifo(src / "list.csv")
    manifest = tmp_path / "m"
    _image(manifest / "b.png", seed=1)
    os.mkfifo(manifest / "c.png")
    (manifest / "m.csv").write_text("image,mask\nb.png,\nc.png,\n")
    dataset = tmp_path / "png"  # a FIFO as an image and as a mask of a png-layout folder
    _image(dataset / "png_images" / "e.png", seed=2)
    os.mkfifo(dataset / "png_images" / "f.png")
    (dataset / "png_masks").mkdir()
    os.mkfifo(dataset / "png_masks" / "e.png")
    out = tmp_path / "o"
    read_end, write_end = os.pipe()  # open, and never written: a read would wait forever
    try:
        done = _cli(
            ["predict", str(run), str(src), str(manifest / "m.csv"), str(dataset), "/dev/stdin",
             "--out", str(out)], stdin=read_end,
        )  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 2, done.stderr
    rows = {r["source"]: r for r in read_rows(out / "results.csv")}
    fifo = "error: not a regular file (a FIFO)"
    assert rows[str(src / "pipe.png")]["status"] == fifo
    assert rows[str(manifest / "c.png")]["status"] == fifo
    assert rows["/dev/stdin"]["status"] == fifo
    assert rows[str(dataset / "png_images" / "f.png")]["status"] == fifo
    for ok in (src / "a.png", manifest / "b.png", dataset / "png_images" / "e.png"):
        assert rows[str(ok)]["status"] == "ok"
    assert len(rows) == 7  # the FIFO mask is no input
    assert "error: 4 of 7 files failed" in done.stderr


def test_inspect_reports_fifos(tmp_path):
    data = tmp_path / "d"
    _image(data / "png_images" / "a.png")
    _mask(data / "png_masks" / "a.png")
    os.mkfifo(data / "png_images" / "b.png")
    manifest = tmp_path / "m"
    _image(manifest / "a.png")
    os.mkfifo(manifest / "b.png")
    (manifest / "m.csv").write_text("image,mask\na.png,\nb.png,\n")
    os.mkfifo(tmp_path / "other.csv")
    for root, fifo in ((data, data / "png_images" / "b.png"), (manifest, manifest / "b.png")):
        done = _cli(["inspect", str(root), "--json"])
        assert done.returncode == 2, done.stderr
        problems = json.loads(done.stdout)["problems"]
        assert [(p["path"], p["kind"]) for p in problems] == [(str(fifo), "irregular")]
        assert problems[0]["problem"].startswith("not a regular file (a FIFO)")
    read_end, write_end = os.pipe()
    try:
        done = _cli(["inspect", "/dev/stdin"], stdin=read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: /dev/stdin: a dataset must be a folder or a manifest CSV, not a FIFO"
    )


def test_readers_refuse_a_fifo_at_once(tmp_path):
    from ptxseg.data.imageio import is_dicom, probe_image, read_image, read_mask_raw
    from ptxseg.errors import DataError
    from ptxseg.fileio import read_text

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    plain = tmp_path / "scan"  # suffix-less: is_dicom would look for the DICM magic
    os.mkfifo(plain)

    def check() -> None:
        for reader in (read_image, probe_image, read_mask_raw, lambda p: read_text(p, "CSV")):
            with pytest.raises(DataError, match=r"x\.png: not a regular file \(a FIFO\)"):
                reader(fifo)
        assert is_dicom(plain) is False

    _within(READ_TIMEOUT, check, fifos=[fifo, plain])


def _within(seconds: float, fn, fifos: list[Path]) -> None:
    """Run ``fn`` in a thread; if it has not returned in time (blocked opening a FIFO), open
    the FIFOs for writing (which lets a blocked reader go on, to EOF) and fail."""
    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        while thread.is_alive():
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass  # no reader waiting on this one
            thread.join(0.1)
        pytest.fail(f"a reader blocked on a FIFO for {seconds} s")
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------- item 15


def test_symlink_loops_are_reported_and_the_rest_predicted(run, tmp_path):
    src = tmp_path / "in"
    _image(src / "a.png")
    os.symlink("x.png", src / "x.png")  # points at itself
    os.symlink("y.png", tmp_path / "y.png")
    out = tmp_path / "o"
    argv = ["predict", str(run), str(src), str(tmp_path / "y.png"), "--out", str(out)]
    rc, _, err = run_cli(argv)
    assert rc == 2
    rows = {Path(r["source"]).name: r for r in read_rows(out / "results.csv")}
    assert rows["x.png"]["status"] == "error: symlink loop"
    assert rows["y.png"]["status"] == "error: symlink loop"
    assert rows["a.png"]["status"] == "ok"
    assert f"warning: {src / 'x.png'}: symlink loop" in err
    assert "Traceback" not in err


def test_a_symlink_loop_as_out_is_one_line(run, tmp_path):
    _image(tmp_path / "a.png")
    os.symlink("o", tmp_path / "o")
    out = tmp_path / "o"
    rc, _, err = run_cli(["predict", str(run), str(tmp_path / "a.png"), "--out", str(out)])
    assert rc == 2
    assert err.strip() == f"error: {out}: --out must be a folder, but it is a symlink loop"


def test_inspect_reports_a_symlink_loop(tmp_path):
    from ptxseg.data.inspect import inspect_dataset

    data = tmp_path / "d"
    _image(data / "png_images" / "a.png")
    _mask(data / "png_masks" / "a.png")
    os.symlink("b.png", data / "png_images" / "b.png")
    report = inspect_dataset(data)
    assert [(p.path, p.problem) for p in report.problems] == [
        (str(data / "png_images" / "b.png"), "symlink loop")
    ]
    assert report.images == 1
