"""A training run killed with SIGKILL in the middle of an epoch, then ``ptxseg train --resume``.

Real subprocesses and a real kill (no monkeypatched crash): the resumed run must finish with
every epoch exactly once in metrics.csv, a loadable best.ckpt, and the learning rate of an
uninterrupted run at every epoch.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ptxseg.data.split import read_split
from ptxseg.plots import read_metrics
from ptxseg.run import Run
from tests.conftest import reap, sigkill, subprocess_env

EPOCHS = 4
BATCH = 4
SETTINGS = {
    "model.encoder": "efficientnet-b0",
    "model.encoder_weights": "null",
    "data.size": 64,
    "data.workers": 0,
    "train.batch_size": BATCH,
    "train.epochs": EPOCHS,
    "train.patience": 50,
    "train.accelerator": "cpu",
    "train.compile": "false",
    "optim.lr": 1e-3,
}


def _ptxseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "ptxseg", *args]


def _env() -> dict[str, str]:
    return subprocess_env(MPLBACKEND="Agg", OMP_NUM_THREADS="1")


def _ckpt_epoch(path: Path) -> int | None:
    """The epoch index saved in a checkpoint (files are renamed into place: complete or absent)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _expected_lr(step: int, total: int, lr: float = 1e-3, lo: float = 1e-6) -> float:
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(step, total - 1) / (total - 1)))


def test_sigkill_mid_epoch_then_resume_gives_every_epoch_once_and_the_same_schedule(tmp_path):
    from ptxseg.data.synthetic import generate

    data, run = tmp_path / "data", tmp_path / "run"
    generate(data, n=48, size=64, seed=3, positive_fraction=0.5)
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        _ptxseg("train", "--data", str(data), "--out", str(run), *sets),
        env=_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # epoch 1 finished: metrics.csv row, then last.ckpt (saved last, atomically)
        _wait(lambda: _ckpt_epoch(run / "last.ckpt") == 0, proc, 120, "the first last.ckpt")
        first_epoch_s = read_metrics(run / "metrics.csv")[0]["time_s"]
        time.sleep(0.3 * first_epoch_s)  # well inside epoch 2
        assert proc.poll() is None, "training ended before it could be killed"
        sigkill(proc)
    finally:
        reap(proc)
        log.close()
    # killed inside epoch 2 (or, on a badly loaded machine, a little later): last.ckpt holds
    # the epochs saved; metrics.csv may hold one more row, written just before the checkpoints
    before = read_metrics(run / "metrics.csv")
    saved = _ckpt_epoch(run / "last.ckpt") + 1
    assert 1 <= saved < EPOCHS and len(before) in (saved, saved + 1)
    assert [r["epoch"] for r in before] == list(range(1, len(before) + 1))

    done = subprocess.run(
        _ptxseg("train", "--data", str(data), "--out", str(run), "--resume"),
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr

    rows = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # each epoch exactly once
    assert rows[:saved] == before[:saved]  # saved epochs kept as written before the kill
    n_train = sum(side == "train" for side in read_split(run / "split.csv").values())
    steps = n_train // BATCH  # the training loader drops the incomplete last batch
    total = EPOCHS * steps
    for r in rows:  # the LR of each epoch's last step, as an uninterrupted run logs it
        np.testing.assert_allclose(r["lr"], _expected_lr(r["epoch"] * steps - 1, total), rtol=1e-6)
    last = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == total

    model, _info = Run(run).load_model("best")
    assert Run(run).config().train.epochs == EPOCHS
    best_epoch = max(rows, key=lambda r: r["val_iou"])["epoch"]
    best = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch - 1
    x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    # a kill during a checkpoint write may leave a hidden temp file; never a visible output
    visible = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert visible == sorted(
        ["config.yaml", "split.csv", "data.json", "best.ckpt", "last.ckpt", "metrics.csv",
         "curves.png"]
    )  # fmt: skip

