"""CPU determinism: same seed and config -> the same run; same inputs -> the same prediction
files, byte for byte, whatever the number of reading processes and writing threads.

(Same-seed ``metrics.csv`` with in-process loading is tested in tests/test_train.py; this file
adds DataLoader worker processes and the checkpoint weights.)
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ptxseg.plots import read_metrics
from ptxseg.postprocess import PostParams
from tests.conftest import make_run, run_bounded

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "predict.json"  # predict.json records timings
    }


def _run_isolated(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``code`` in a new session; on timeout kill the whole group (hung DataLoader workers
    included) and fail, rather than hang the test run."""
    return run_bounded([sys.executable, "-c", code], timeout, "the child", cwd=REPO)


def _used_opencv_threads() -> None:
    """Leave OpenCV's thread pool started and idle (its threads asleep on a condition), as
    after synthesising or resizing images in this process."""
    cv2.GaussianBlur(np.zeros((2000, 2000), np.float32), (0, 0), 3)
    time.sleep(0.3)


def _worker_init_in_fork(queue) -> None:
    from ptxseg.data.dataset import worker_init

    worker_init(0)
    queue.put(cv2.getNumThreads())


def test_dataloader_worker_init_after_the_parent_used_opencv_does_not_hang():
    """``cv2.setNumThreads(1)`` in a forked worker tears down the inherited thread pool and
    deadlocks when the parent had used it (every training run after ``generate`` or a resize
    in the same process); the worker must switch OpenCV to sequential without touching it."""
    _used_opencv_threads()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker_init_in_fork, args=(queue,), daemon=True)
    proc.start()
    proc.join(timeout=20)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("worker_init hung in a forked worker")
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == 1  # OpenCV runs sequentially in the worker


TRAIN_TWICE = """
import json, sys, time
import cv2, numpy as np
from ptxseg.data.synthetic import generate
from ptxseg.train import fit
from tests.conftest import tiny_config
out = sys.argv[1]
generate(out + "/data", n=12, size=64, seed=5)
cv2.GaussianBlur(np.zeros((2000, 2000), np.float32), (0, 0), 3)  # pool started, then idle
time.sleep(0.3)
cfg = tiny_config(**{"train.epochs": 1, "data.workers": 1, "optim.lr": 1e-3})
for i in range(2):
    fit(cfg, out + "/data", f"{out}/run{i}", progress=False)
"""


def test_training_with_worker_processes_is_repeatable(tmp_path):
    done = _run_isolated(TRAIN_TWICE.replace("sys.argv[1]", repr(str(tmp_path))), 240)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [tmp_path / "run0", tmp_path / "run1"]
    a, b = (read_metrics(r / "metrics.csv") for r in runs)
    assert len(a) == 1 and a[0]["train_loss"] > 0
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in a] == [
        {k: v for k, v in r.items() if k != "time_s"} for r in b
    ]
    wa, wb = (torch.load(r / "best.ckpt", map_location="cpu", weights_only=True) for r in runs)
    assert wa["state_dict"].keys() == wb["state_dict"].keys()
    for key, value in wa["state_dict"].items():
        assert torch.equal(value, wb["state_dict"][key]), key
    assert (runs[0] / "split.csv").read_bytes() == (runs[1] / "split.csv").read_bytes()


def test_predict_twice_gives_byte_identical_outputs(tmp_path):
    from ptxseg.data.synthetic import generate
    from ptxseg.predict import predict

    run = tmp_path / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=5, size=64))
    images = tmp_path / "images"
    generate(images, n=7, size=80, seed=2)
    outs = []
    for i, (workers, batch) in enumerate([(0, 4), (2, 3), (2, 3)]):
        out = tmp_path / f"out{i}"
        summary = predict(
            run, [images / "png_images"], out, kaggle_csv=out / "submission.csv",
            workers=workers, batch_size=batch, device="cpu", progress=False,
        )  # fmt: skip
        assert summary.n_images == 7 and summary.n_errors == 0
        outs.append(_files(out))
    first = outs[0]
    assert len([k for k in first if k.startswith("masks/")]) == 7
    assert len([k for k in first if k.startswith("overlays/")]) == 7
    assert {"results.csv", "submission.csv"} <= first.keys()
    assert 0 < sum(b"1" == line.split(b",")[4] for line in first["results.csv"].splitlines()[1:])
    for other in outs[1:]:
        assert other.keys() == first.keys()
        assert [k for k in first if first[k] != other[k]] == []
