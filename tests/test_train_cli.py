"""``ptxseg train`` and ``ptxseg prepare`` through the command line."""

from __future__ import annotations

import cv2

from ptxseg.cli import main
from ptxseg.plots import read_metrics
from ptxseg.run import Run

CPU_SETS = [
    "--set", "model.encoder=efficientnet-b0",
    "--set", "model.encoder_weights=null",
    "--set", "data.size=64",
    "--set", "data.workers=0",
    "--set", "train.batch_size=16",
    "--set", "train.epochs=1",
    "--set", "train.accelerator=cpu",
    "--set", "train.compile=false",
]  # fmt: skip


def test_train_on_the_real_siim_sample_writes_a_run_folder(sample_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--config", "paper", "--data", str(sample_dir), "--out", str(run),
                 *CPU_SETS])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for name in ("config.yaml", "split.csv", "best.ckpt", "last.ckpt", "metrics.csv", "curves.png"):
        assert (run / name).stat().st_size > 0, name
    cfg = Run(run).config()
    assert (cfg.data.size, cfg.model.encoder, cfg.train.epochs) == (64, "efficientnet-b0", 1)
    assert cfg.optim.lr == 1e-4 and cfg.augment.enabled  # the rest is the paper's recipe
    rows = read_metrics(run / "metrics.csv")
    assert len(rows) == 1 and 0 <= rows[0]["val_iou"] <= 1
    split_lines = (run / "split.csv").read_text().splitlines()
    assert len(split_lines) == 1 + 108
    assert "1 epoch in" in out and "best val IoU" in out and str(run / "best.ckpt") in out


def test_unknown_config_key_is_one_line_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path), "--out", str(run), "--set", "train.bogus=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'train.bogus'" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_existing_run_is_refused_without_resume(tiny_run, synth_data, capsys):
    code = main(["train", "--data", str(synth_data), "--out", str(tiny_run), *CPU_SETS])
    err = capsys.readouterr().err
    assert code == 2
    assert "already exists and is not empty; use --resume" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_of_a_folder_that_is_no_run_is_refused(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path), "--resume"])
    assert code == 2
    assert "not a run folder to resume (no config.yaml)" in capsys.readouterr().err


def test_prepare_command(synth_data, tmp_path, capsys):
    out = tmp_path / "prepared"
    code = main(["prepare", str(synth_data), str(out), "--size", "32"])
    assert code == 0
    assert "wrote 16 image/mask pairs at 32x32" in capsys.readouterr().out
    image = cv2.imread(str(next((out / "png_images").iterdir())), cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32)
    assert main(["prepare", str(synth_data), str(out), "--size", "32"]) == 2
    assert "not empty" in capsys.readouterr().err
