"""Training runs on synthetic data (CPU, efficientnet-b0 at 64 px, a few seconds each)."""

from __future__ import annotations

import json
import math
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from ptxseg.config import load_config
from ptxseg.data.split import read_split
from ptxseg.errors import CheckpointError, DataError, RunDirError
from ptxseg.hardware import lightning_precision, resolve_switch
from ptxseg.lightning_module import (
    CosineToMin,
    SegModule,
    TrainingError,
    freeze_unused_parameters,
)
from ptxseg.plots import METRICS_COLUMNS, read_metrics
from ptxseg.run import Run
from ptxseg.train import fit
from ptxseg.trainer import AtomicCheckpointIO, RunFiles, build_trainer
from tests.conftest import TINY_RUN_SETTINGS, tiny_config

RUN_FILES = (
    "config.yaml",
    "split.csv",
    "data.json",
    "best.ckpt",
    "last.ckpt",
    "metrics.csv",
    "curves.png",
)


def _steps_per_epoch(run) -> int:
    n_train = sum(v == "train" for v in read_split(run / "split.csv").values())
    bs = Run(run).config().train.batch_size
    return n_train // bs if n_train > bs else 1  # drop_last


def _expected_lr(cfg, step: int, total: int) -> float:
    lr, lo = cfg.optim.lr, cfg.optim.lr_min
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------
# a full run (the session's tiny_run fixture)


def test_run_writes_every_file_with_content_and_lowers_the_loss(tiny_run, synth_data):
    assert sorted(p.name for p in tiny_run.iterdir()) == sorted(RUN_FILES)
    assert Run(tiny_run).config() == tiny_config(**TINY_RUN_SETTINGS)
    split = read_split(tiny_run / "split.csv")
    assert sorted(split) == sorted(p.stem for p in (synth_data / "png_images").iterdir())
    assert set(split.values()) == {"train", "val"}
    assert json.loads((tiny_run / "data.json").read_text())["root"] == str(synth_data.resolve())

    header = (tiny_run / "metrics.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == METRICS_COLUMNS
    rows = read_metrics(tiny_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for r in rows:
        assert 0 <= r["val_iou"] <= r["val_dice"] <= 1  # Dice >= IoU always
        assert r["val_loss"] > 0 and r["time_s"] > 0

    curves = cv2.imread(str(tiny_run / "curves.png"))
    assert curves is not None and curves.shape == (400, 1000, 3)
    assert curves.std() > 10  # something was drawn

    last = _ckpt(tiny_run / "last.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * _steps_per_epoch(tiny_run)
    assert all(k.startswith("model.") for k in last["state_dict"])
    assert not list(tiny_run.glob(".*"))  # no temp files left


def test_validation_iou_is_pooled_over_the_whole_validation_set(tiny_run, synth_data):
    rows = read_metrics(tiny_run / "metrics.csv")
    best_iou = max(r["val_iou"] for r in rows)
    best = next(r for r in rows if r["val_iou"] == best_iou)  # first epoch reaching it
    state = _ckpt(tiny_run / "best.ckpt")
    assert state["epoch"] == best["epoch"] - 1
    model, _info = Run(tiny_run).load_model("best")

    val_ids = sorted(i for i, s in read_split(tiny_run / "split.csv").items() if s == "val")
    tp = fp = fn = 0
    for ident in val_ids:
        image = cv2.imread(str(synth_data / "png_images" / f"{ident}.png"), cv2.IMREAD_GRAYSCALE)
        truth = cv2.imread(str(synth_data / "png_masks" / f"{ident}.png"), cv2.IMREAD_GRAYSCALE) > 0
        with torch.no_grad():
            logits = model(torch.from_numpy(image)[None, None]).numpy()[0, 0]
        pred = 1 / (1 + np.exp(-logits.astype(np.float64))) > 0.5
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
    assert tp + fp + fn > 0
    np.testing.assert_allclose(best["val_iou"], tp / (tp + fp + fn), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(best["val_dice"], 2 * tp / (2 * tp + fp + fn), rtol=1e-6, atol=1e-7)


def test_lr_follows_the_cosine_schedule_and_ends_at_lr_min(tiny_run):
    cfg = Run(tiny_run).config()
    k = _steps_per_epoch(tiny_run)
    total = cfg.train.epochs * k
    rows = read_metrics(tiny_run / "metrics.csv")
    for r in rows:  # metrics.csv logs the LR of the epoch's last step
        expected = _expected_lr(cfg, r["epoch"] * k - 1, total)
        np.testing.assert_allclose(r["lr"], expected, rtol=1e-6)
    assert rows[-1]["lr"] == cfg.optim.lr_min == 1e-6


def test_cosine_factor_edges():
    f = CosineToMin(5, 0.01)
    assert f(0) == 1.0 and f(4) == pytest.approx(0.01) and f(10) == pytest.approx(0.01)
    assert f(2) == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(f(i) > f(i + 1) for i in range(4))
    assert CosineToMin(1, 0.01)(0) == 1.0


def test_checkpoints_load_with_weights_only_and_describe_their_model(tiny_run):
    for which in ("best", "last"):
        obj = _ckpt(tiny_run / f"{which}.ckpt")
        assert "optimizer_states" in obj and "lr_schedulers" in obj
        model, info = Run(tiny_run).load_model(which)
        assert info.embedded and info.model == Run(tiny_run).config().model
        assert info.size == 64 and info.model.encoder == "efficientnet-b0"
        x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()


def test_same_seed_gives_the_same_metrics(tiny_run, synth_data, tmp_path):
    again = fit(tiny_config(**TINY_RUN_SETTINGS), synth_data, tmp_path / "again", progress=False)
    a = read_metrics(tiny_run / "metrics.csv")
    b = read_metrics(again / "metrics.csv")
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in b]
    assert (tiny_run / "split.csv").read_text() == (again / "split.csv").read_text()


# ------------------------------------------------------------------------------------------
# resume, refusals, failures


def test_resume_continues_from_the_saved_epoch_with_the_same_schedule(
    synth_data, tmp_path, monkeypatch
):
    cfg = tiny_config(**{"train.epochs": 3})
    run = tmp_path / "run"
    original = RunFiles.on_validation_end

    def crash_in_epoch_2(self, trainer, pl_module):
        if pl_module.current_epoch == 1:
            raise RuntimeError("simulated crash")
        original(self, trainer, pl_module)

    monkeypatch.setattr(RunFiles, "on_validation_end", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, synth_data, run, progress=False)
    first = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in first] == [1]
    assert _ckpt(run / "last.ckpt")["epoch"] == 0
    monkeypatch.setattr(RunFiles, "on_validation_end", original)

    with pytest.raises(RunDirError, match="already exists"):
        fit(cfg, synth_data, run, progress=False)  # no silent overwrite
    fit(cfg, synth_data, run, resume=True, progress=False)
    rows = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0] == first[0]
    k = _steps_per_epoch(run)
    last = _ckpt(run / "last.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * k
    for r in rows:
        np.testing.assert_allclose(r["lr"], _expected_lr(cfg, r["epoch"] * k - 1, 3 * k), rtol=1e-6)
    assert rows[-1]["lr"] == 1e-6


def test_resume_refuses_a_changed_recipe_and_a_folder_without_config(tiny_run, tmp_path):
    changed = tiny_config(**{**TINY_RUN_SETTINGS, "optim.lr": 0.5})
    with pytest.raises(RunDirError, match=r"optim\.lr: 0\.001 -> 0\.5"):
        fit(changed, tmp_path, tiny_run, resume=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=r"not a run folder to resume \(no config.yaml\)"):
        fit(tiny_config(), tmp_path, empty, resume=True, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "last.ckpt").write_bytes((broken / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="last.ckpt"):
        fit(Run(broken).config(), tmp_path, broken, resume=True, progress=False)


def test_existing_run_folder_is_refused_and_left_untouched(tiny_run, synth_data):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    with pytest.raises(RunDirError, match="already exists and is not empty; use --resume"):
        fit(tiny_config(), synth_data, tiny_run, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    synth_data, tmp_path, monkeypatch
):
    original = SegModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(SegModule, "training_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"NaN/inf \(epoch 2\).*last good epoch"):
        fit(tiny_config(**{"train.epochs": 3}), synth_data, run, progress=False)
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1]
    last = _ckpt(run / "last.ckpt")
    assert last["epoch"] == 0
    weights = [v for v in last["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)


def test_validation_without_positive_case_warns_and_trains(tmp_path):
    """No lesion in the validation split: a warning, and the SIIM rule that an empty
    prediction on an empty mask scores 1. The model starts from weights that predict nothing
    (a head bias of -30, a learning rate too small to move it), so its val IoU and Dice must
    be exactly 1, as a hand count of its false positives (none) says."""
    from ptxseg.checkpoint import save_model_checkpoint
    from ptxseg.data.synthetic import generate
    from ptxseg.model import build_model

    data = tmp_path / "negatives"
    generate(data, n=10, size=64, seed=1, positive_fraction=0.0)
    quiet = build_model(tiny_config().model, pretrained=False)
    with torch.no_grad():
        quiet.net.segmentation_head[0].bias.fill_(-30.0)
    save_model_checkpoint(quiet, tmp_path / "quiet.ckpt", tiny_config())
    cfg = tiny_config(**{"train.epochs": 1, "model.init_from": str(tmp_path / "quiet.ckpt"),
                         "optim.lr": 1e-9, "optim.lr_min": 0})  # fmt: skip
    with pytest.warns(UserWarning, match="no positive case"):
        run = fit(cfg, data, tmp_path / "run", progress=False)
    rows = read_metrics(run / "metrics.csv")
    assert len(rows) == 1 and (run / "best.ckpt").is_file()
    model, _ = Run(run).load_model("last")
    fp = 0
    for ident, side in read_split(run / "split.csv").items():
        if side == "val":
            img = cv2.imread(str(data / "png_images" / f"{ident}.png"), cv2.IMREAD_GRAYSCALE)
            with torch.no_grad():
                fp += int((model(torch.from_numpy(img)[None, None]) > 0).sum())
    assert fp == 0  # the premise: nothing predicted, on nothing to find
    assert (rows[0]["val_iou"], rows[0]["val_dice"]) == (1.0, 1.0)


def test_validation_iou_and_dice_are_the_pooled_pixel_counts(tiny_run, synth_data):
    """The last epoch's val IoU/Dice in metrics.csv equal a hand computation with the last
    checkpoint: logit > 0 against the masks at model size, pixels pooled over the validation
    split."""
    model, _ = Run(tiny_run).load_model("last")
    tp = fp = fn = 0
    for ident, side in read_split(tiny_run / "split.csv").items():
        if side != "val":
            continue
        img = cv2.imread(str(synth_data / "png_images" / f"{ident}.png"), cv2.IMREAD_GRAYSCALE)
        gt = cv2.imread(str(synth_data / "png_masks" / f"{ident}.png"), cv2.IMREAD_GRAYSCALE) > 0
        with torch.no_grad():
            pred = (model(torch.from_numpy(img)[None, None]) > 0)[0, 0].numpy()
        tp += int((pred & gt).sum())
        fp += int((pred & ~gt).sum())
        fn += int((~pred & gt).sum())
    assert tp > 0 and fp + fn > 0  # an informative case: neither 0 nor 1
    row = read_metrics(tiny_run / "metrics.csv")[-1]
    assert row["val_iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-6)
    assert row["val_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-6)


def test_a_validation_split_whose_lesions_vanish_at_model_size_warns(tmp_path):
    """Positive by label, but every lesion pixel lost when the masks are resized to the model's
    input (one pixel of 256 px at 64 px): the training module itself says so, since val
    IoU/Dice then only measure false positives."""
    from ptxseg.data.resize import resize_mask

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for sub in ("png_images", "png_masks"):
        (data / sub).mkdir(parents=True)
    for i in range(12):
        mask = np.zeros((256, 256), np.uint8)
        if i % 2 == 0:
            mask[rng.integers(8, 248), rng.integers(8, 248)] = 255
        assert not resize_mask(mask > 0, 64).any()  # the premise: nothing left at 64 px
        cv2.imwrite(str(data / "png_images" / f"{i:02d}.png"),
                    rng.integers(0, 256, (256, 256), dtype=np.uint8))  # fmt: skip
        cv2.imwrite(str(data / "png_masks" / f"{i:02d}.png"), mask)
    with pytest.warns(UserWarning) as caught:
        fit(tiny_config(**{"train.epochs": 1}), data, tmp_path / "run", progress=False)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("the validation set has no positive pixel: val IoU/Dice only "
                            "measure false positives") for m in messages), messages  # fmt: skip
    assert not any("has no positive case" in m for m in messages)  # labels say positive


# ------------------------------------------------------------------------------------------
# pieces


def test_paper_model_trains_a_step_at_64_without_weights():
    cfg = load_config("paper", ["model.encoder_weights=null"])
    module = SegModule(cfg)
    assert type(module.model.net.encoder).__name__ == "EfficientNetEncoder"
    assert cfg.model.encoder == "efficientnet-b4"
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    y = torch.zeros((2, 1, 64, 64), dtype=torch.uint8)
    y[:, :, 20:40, 10:30] = 1
    logits = module(x)
    assert logits.shape == (2, 1, 64, 64)
    loss = module.loss_fn(logits, y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_freeze_unused_parameters_for_ddp_changes_no_weight():
    module = SegModule(tiny_config())
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    frozen = freeze_unused_parameters(module.model)
    assert frozen == ["net.encoder._conv_head.weight", "net.encoder._bn1.weight",
                      "net.encoder._bn1.bias"]  # fmt: skip
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert module.model.training
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    module.loss_fn(module(x), torch.ones_like(x)).backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)


def test_precision_compile_and_channels_last_resolution(monkeypatch):
    assert lightning_precision("auto", "cpu") == "32-true"
    assert lightning_precision("32", "cuda") == "32-true"
    assert lightning_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert lightning_precision("auto", "cuda") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert lightning_precision("auto", "cuda") == "16-mixed"
    assert resolve_switch("auto", "cuda") is True
    assert resolve_switch("auto", "cpu") is False
    assert resolve_switch(False, "cuda") is False


def test_atomic_checkpoint_io_keeps_the_old_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"model.w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure
        io.save_checkpoint({"state_dict": {"model.w": torch.zeros(3)}, "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(synth_data, tmp_path):
    """Weights that cannot be loaded: refused before anything is written. A data error in the
    first epoch: the new run folder is removed again, so the same command can be re-run."""
    from ptxseg.errors import ConfigError

    out = tmp_path / "run"
    bad_weights = tiny_config(**{"model.encoder_weights": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match="missing.pth: file not found"):
        fit(bad_weights, synth_data, out, progress=False)
    assert not out.exists()

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    victim = sorted((data / "png_images").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG, read in the first epoch
    with pytest.raises(DataError, match=victim.name):
        fit(tiny_config(), data, out, progress=False)
    assert not out.exists()


def test_deterministic_switch_reaches_torch_and_is_reset(tmp_path):
    try:
        build_trainer(tiny_config(**{"train.deterministic": True}), tmp_path, progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")  # set for deterministic cuBLAS
    finally:
        build_trainer(tiny_config(), tmp_path, progress=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_read_metrics_names_the_line_of_a_short_or_bad_row(tmp_path):
    path = tmp_path / "metrics.csv"
    header = ",".join(METRICS_COLUMNS)
    path.write_text(f"{header}\n1,0.5,0.4,0.3,0.4,1e-4,2.0\n2,0.5\n")
    with pytest.raises(DataError, match=r"line 3: missing cell"):
        read_metrics(path)
    path.write_text(f"{header}\n1,0.5,0.4,abc,0.4,1e-4,2.0\n")
    with pytest.raises(DataError, match=r"line 2: not a number"):
        read_metrics(path)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="cannot read metrics file"):
        read_metrics(path)
