"""What training tells the user: plain progress lines where stderr is a log (issue 10, item
2), plurals (item 11), a warning for non-binary masks (item 23), one line and exit 2 on a full
disk (item 16), and where the run stands after Ctrl-C (item 23)."""

from __future__ import annotations

import errno
import re
import shlex
import shutil
import signal

import cv2
import numpy as np
import pytest
import torch

from ptxseg.cli import main
from ptxseg.data.inspect import non_binary_masks
from ptxseg.lightning_module import SegModule
from ptxseg.plots import read_metrics
from ptxseg.run import Run
from ptxseg.train import TrainingInterrupted, fit
from ptxseg.trainer import EpochLines, ProgressBar, RunFiles, WriteError, build_trainer
from tests.conftest import tiny_config

CPU_SETS = [
    "--set", "model.encoder=efficientnet-b0",
    "--set", "model.encoder_weights=null",
    "--set", "data.size=64",
    "--set", "data.workers=0",
    "--set", "train.batch_size=4",
    "--set", "train.accelerator=cpu",
    "--set", "train.compile=false",
]  # fmt: skip

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+): train loss ([\d.]+), val IoU ([\d.]+), Dice ([\d.]+), ([\d.]+) s"
    r"(?:, ETA (\d+ s|\d+ min \d\d s|\d+ h \d\d min))?$"
)


# ------------------------------------------------------------------------------------------
# progress lines (item 2) and plurals (item 11)


def test_a_log_gets_one_line_per_stage_and_per_epoch(synth_data, tmp_path, capsys):
    """Through the command line: the library draws the progress lines, and hands the
    announcement back for the command line to print (``fit`` alone prints no notes)."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_data), "--out", str(run), *CPU_SETS,
                 "--set", "train.epochs=2"]) == 0  # fmt: skip
    err = capsys.readouterr().err  # captured: not a terminal
    lines = err.splitlines()
    assert "━" not in err and "\r" not in err  # no progress bar drawn into the log
    assert lines[0] == f"loading data: {synth_data} (layout auto)"
    assert lines[1] == "building model: unet/efficientnet-b0"
    assert lines[2].startswith("training on ") and lines[2].endswith(f"up to 2 epochs; "
                                                                     f"writing {run}")
    assert re.fullmatch(r"training epochs 1-2 \(\d+ steps per epoch, validation after each\)",
                        lines[3])  # fmt: skip
    rows = read_metrics(run / "metrics.csv")
    epoch_lines = [EPOCH_LINE.match(line) for line in lines[4:]]
    assert len(epoch_lines) == len(rows) == 2 and all(epoch_lines)
    for m, row in zip(epoch_lines, rows, strict=True):
        assert (int(m[1]), int(m[2])) == (row["epoch"], 2)
        assert m[3] == f"{row['train_loss']:.4f}"
        assert m[4] == f"{row['val_iou']:.4f}" and m[5] == f"{row['val_dice']:.4f}"
        assert abs(float(m[6]) - row["time_s"]) <= 0.051
    assert epoch_lines[0][7] is not None and epoch_lines[1][7] is None  # no ETA at the end


def test_a_terminal_keeps_the_rich_bar(tmp_path, monkeypatch):
    import ptxseg.trainer as trainer_mod

    for tty, kind in ((True, ProgressBar), (False, EpochLines)):
        monkeypatch.setattr(trainer_mod, "stderr_is_terminal", lambda tty=tty: tty)
        trainer = build_trainer(tiny_config(), tmp_path, progress=True)
        shown = [type(c) for c in trainer.callbacks if isinstance(c, ProgressBar | EpochLines)]
        assert shown == [kind]
    quiet = build_trainer(tiny_config(), tmp_path, progress=False)
    assert not any(isinstance(c, ProgressBar | EpochLines) for c in quiet.callbacks)


def test_cli_train_log_lines_and_one_epoch_singular(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(synth_data), "--out", str(run), *CPU_SETS,
                 "--set", "train.epochs=1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "up to 1 epoch; writing" in err and "1 epochs" not in err + out
    row = read_metrics(run / "metrics.csv")[0]
    assert (
        f"epoch 1/1: train loss {row['train_loss']:.4f}, val IoU {row['val_iou']:.4f}, "
        f"Dice {row['val_dice']:.4f}, "
    ) in err
    assert out.startswith("1 epoch in ")


def test_run_summary_says_1_epoch(tmp_path):
    from ptxseg.config import save_config
    from ptxseg.train import run_summary
    from ptxseg.trainer import format_metrics

    save_config(tiny_config(**{"train.epochs": 5, "train.patience": 1}), tmp_path / "config.yaml")
    row = {"train_loss": 1.0, "val_loss": 1.0, "val_iou": 0.25, "val_dice": 0.4, "lr": 1e-4,
           "time_s": 30.0}  # fmt: skip
    (tmp_path / "metrics.csv").write_text(format_metrics([{**row, "epoch": 1}]))
    assert run_summary(tmp_path).startswith(
        "1 epoch in 0.5 min, stopped early (1 epoch without improvement); best val IoU 0.2500"
    )


def test_tune_prints_the_chosen_threshold_and_area(tiny_run, synth_data, tmp_path, capsys):
    from ptxseg.postprocess import load_params

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["tune", str(run), "--data", str(synth_data)]) == 0
    out = capsys.readouterr().out
    params = load_params(run / "thresholds.json")
    assert params.describe() in out and str(run / "thresholds.json") in out


# ------------------------------------------------------------------------------------------
# non-binary masks (item 23): a sample is checked with inspect's rule


def test_noise_masks_in_training_data_give_a_warning(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    masks = sorted((data / "png_masks").glob("*.png"))
    rng = np.random.default_rng(0)
    for path in masks[1:4]:
        noise = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
        cv2.imwrite(str(path), noise)
    # inspect calls them non-binary: the same files
    from ptxseg.data.inspect import inspect_dataset

    flagged = {p.path for p in inspect_dataset(data).problems if p.kind == "non-binary"}
    assert flagged == {str(p) for p in masks[1:4]}
    with pytest.warns(UserWarning) as record:
        fit(tiny_config(**{"train.epochs": 1}), data, tmp_path / "run", progress=False)
    msgs = [str(w.message) for w in record if "not binary" in str(w.message)]
    assert len(msgs) == 1
    assert msgs[0].startswith(f"3 of all 16 mask files are not binary (more than one non-zero "
                              f"value, e.g. {masks[1]})")  # fmt: skip
    assert f"`ptxseg inspect {data}`" in msgs[0]


def test_the_mask_check_reads_an_evenly_spaced_sample(synth_data):
    from ptxseg.data.sources import load_records

    records, _ = load_records(synth_data)
    bad, read, total = non_binary_masks(records, limit=4)
    assert (bad, read, total) == ([], 4, 16)
    bad, read, total = non_binary_masks(records)
    assert (bad, read, total) == ([], 16, 16)


# ------------------------------------------------------------------------------------------
# a full disk while saving (item 16)

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4241"


def _full_disk_at_epoch(monkeypatch, epoch: int, exc: BaseException):
    """torch.save that writes part of a checkpoint of ``epoch`` (0-based), then fails."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == epoch:
            f.write(b"PK\x03\x04 partial")
            raise exc
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_is_one_line_exit_2_and_the_last_checkpoint_is_kept(
    synth_data, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    _full_disk_at_epoch(monkeypatch, 1, RuntimeError(TORCH_SHORT_WRITE))
    code = main(["train", "--data", str(synth_data), "--out", str(run), *CPU_SETS,
                 "--set", "train.epochs=3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    m = re.fullmatch(
        rf"error: {re.escape(str(run))}/(best|last)\.ckpt: disk full / could not write "
        rf"\({re.escape(TORCH_SHORT_WRITE)}\); the previous (best|last)\.ckpt is kept",
        errors[0],
    )
    assert m and m[1] == m[2]
    monkeypatch.undo()
    last = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0  # epoch 1, intact
    assert not list(run.glob(".*"))  # no temp file left


def test_enospc_from_the_os_is_the_same_error(synth_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _full_disk_at_epoch(monkeypatch, 0, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(WriteError) as exc:
        fit(tiny_config(**{"train.epochs": 1}), synth_data, run, progress=False)
    assert re.fullmatch(
        rf"{re.escape(str(run))}/(best|last)\.ckpt: disk full / could not write \(No space "
        r"left on device\); no (best|last)\.ckpt written",
        str(exc.value),
    )
    assert not run.exists()  # a new run that saved no checkpoint is removed


def test_a_failed_metrics_write_names_the_file(tmp_path, monkeypatch):
    import ptxseg.trainer as trainer_mod

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_mod, "write_text", full)
    files = RunFiles(Run(tmp_path))
    files.rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_iou": 0.1,
                   "val_dice": 0.2, "lr": 1e-4, "time_s": 1.0}]  # fmt: skip

    class Trainer:
        is_global_zero = True

    with pytest.raises(WriteError, match=r"metrics.csv: disk full / could not write \(No space"):
        files._write(Trainer())


# ------------------------------------------------------------------------------------------
# Ctrl-C (item 23)


def _ctrl_c_in_epoch(monkeypatch, epoch: int):
    original = SegModule.training_step

    def step(self, batch, batch_idx):
        if self.current_epoch == epoch and batch_idx == 1:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SegModule, "training_step", step)


def test_ctrl_c_after_epoch_1_says_where_the_run_stands_and_how_to_resume(
    synth_data, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    _ctrl_c_in_epoch(monkeypatch, 1)
    code = main(["train", "--data", str(synth_data), "--out", str(run), *CPU_SETS,
                 "--set", "train.epochs=3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN undone
    monkeypatch.undo()
    row = read_metrics(run / "metrics.csv")[0]
    command = f"ptxseg train --data {synth_data} --out {run} --resume"
    assert err.splitlines()[-1] == (
        f"interrupted: training interrupted; {run}: last finished epoch 1 of 3 (last.ckpt); "
        f"best val IoU {row['val_iou']:.4f} at epoch 1 (best.ckpt); continue with: {command}"
    )
    # the command printed does continue the run
    assert main(shlex.split(command)[1:]) == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1, 2, 3]


def test_ctrl_c_in_the_first_epoch_of_a_new_run(synth_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _ctrl_c_in_epoch(monkeypatch, 0)
    with pytest.raises(TrainingInterrupted) as exc:
        fit(tiny_config(), synth_data, run, progress=False)
    assert str(exc.value) == (
        f"training interrupted before its first epoch finished; {run} was removed, run the "
        "same command again to start over"
    )
    assert not run.exists()
