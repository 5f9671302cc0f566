"""Continuing runs: extending a finished run (``--resume --set train.epochs=N``), fine-tuning
from another run (``model.init_from``) and restarting a run that died before its first
checkpoint. CPU, EfficientNet-B0 at 64 px, a few seconds per run."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
import yaml

from ptxseg.cli import main
from ptxseg.config import load_config
from ptxseg.data.split import read_split
from ptxseg.errors import CheckpointError, ConfigError, RunDirError
from ptxseg.lightning_module import SegModule
from ptxseg.plots import read_metrics
from ptxseg.resume import plan_resume
from ptxseg.run import Run
from ptxseg.train import fit
from ptxseg.trainer import RunEarlyStopping, RunFiles
from tests.conftest import TINY_RUN_SETTINGS, tiny_config


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _steps_per_epoch(run) -> int:
    n_train = sum(v == "train" for v in read_split(run / "split.csv").values())
    bs = Run(run).config().train.batch_size
    return n_train // bs if n_train > bs else 1  # drop_last


def _cosine(lr: float, lo: float, i: int, n: int) -> float:
    """Step ``i`` of ``n`` of a cosine from ``lr`` down to ``lo`` (written independently)."""
    return lo + (lr - lo) * (1 + math.cos(math.pi * i / (n - 1))) / 2


@pytest.fixture
def spy_lr(monkeypatch):
    """The LR each training step runs with (read before the optimizer step)."""
    seen: list[float] = []
    original = SegModule.training_step

    def spy(self, batch, batch_idx):
        seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SegModule, "training_step", spy)
    return seen


# ------------------------------------------------------------------------------------------
# extending a finished run


def test_extending_a_finished_run_restarts_the_cosine_over_the_added_epochs(
    tiny_run, synth_data, tmp_path, spy_lr
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = read_metrics(run / "metrics.csv")
    old_cfg = Run(run).config()
    assert [r["epoch"] for r in before] == [1, 2, 3] and before[-1]["lr"] == old_cfg.optim.lr_min

    cfg = load_config(run / "config.yaml", ["train.epochs=4"])
    fit(cfg, synth_data, run, resume=True, progress=False)

    rows = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[:3] == before  # metrics.csv continues, the old rows untouched
    k = _steps_per_epoch(run)
    lr, lo = cfg.optim.lr, cfg.optim.lr_min
    assert len(spy_lr) == k >= 2  # only the added epoch trained
    assert spy_lr[0] == lr  # warm restart: the first added step runs at optim.lr
    for i, seen in enumerate(spy_lr):
        assert seen == pytest.approx(_cosine(lr, lo, i, k), rel=1e-9)
    assert spy_lr[-1] == pytest.approx(lo, rel=1e-9)
    assert rows[3]["lr"] == pytest.approx(lo, rel=1e-6)  # the epoch's last step, as logged

    last = _ckpt(run / "last.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 4 * k
    assert last["ptxseg"]["epochs"] == 4  # the schedule's length, beside the model's description
    assert last["ptxseg"]["model"] == cfg.model.model_dump(mode="json")
    best_row = max(rows, key=lambda r: r["val_iou"])  # first epoch reaching the best
    assert _ckpt(run / "best.ckpt")["epoch"] == best_row["epoch"] - 1  # best of the whole run

    # the run folder records the extension
    saved = Run(run).config()
    assert saved.train.epochs == 4
    assert saved.model_copy(update={"train": old_cfg.train}) == old_cfg  # nothing else changed
    text = (run / "config.yaml").read_text()
    assert text.startswith("# extended at epoch 3: train.epochs 3 -> 4, a new cosine segment")
    history = json.loads((run / "data.json").read_text())["history"]
    assert [(h["event"], h["at_epoch"], h["epochs"]) for h in history] == [
        ("extended", 3, [3, 4])
    ]


def test_extension_bounds_and_a_finished_run(tiny_run, synth_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for epochs in (2, 3):
        cfg = load_config(run / "config.yaml", [f"train.epochs={epochs}"])
        if epochs < 3:
            with pytest.raises(RunDirError) as exc:
                fit(cfg, synth_data, run, resume=True, progress=False)
            assert str(exc.value) == (
                f"{run}: train.epochs=2, but the run has already done 3 epochs; to extend it, "
                "set train.epochs above 3"
            )
    # the same epochs: a finished run has nothing to resume (a warning, no change)
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.warns(UserWarning, match=r"has finished its 3 epochs, nothing to resume; to "
                                         r"train more, extend it with --set train.epochs=N"):
        fit(Run(run).config(), synth_data, run, resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps


def test_early_stopping_state_on_resume(tiny_run, tmp_path):
    """A run stopped early has nothing to resume unless the patience grows; an extension
    restarts the patience count; the configured patience always wins over the saved one."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = _ckpt(run / "last.ckpt")
    key = next(k for k in ckpt["callbacks"] if k.startswith("EarlyStopping"))
    assert key == RunEarlyStopping(5).state_key
    ckpt["callbacks"][key]["wait_count"] = 2
    ckpt["callbacks"][key]["patience"] = 2
    ckpt["epoch"] = 1  # stopped after epoch 2 of 3
    torch.save(ckpt, run / "last.ckpt")

    cfg = load_config(run / "config.yaml", ["train.patience=2"])
    plan = plan_resume(cfg, run)
    assert plan.finished and "stopped early after epoch 2 (2 epochs without a better val IoU)" \
        in plan.finished  # fmt: skip
    plan = plan_resume(load_config(run / "config.yaml", ["train.patience=4"]), run)
    assert plan.finished is None and plan.extend_from is None and plan.done == 2

    state = dict(ckpt["callbacks"][key])
    plain = RunEarlyStopping(4)
    plain.load_state_dict(state)
    assert (plain.patience, plain.wait_count) == (4, 2)
    extended = RunEarlyStopping(4, restart=True)
    extended.load_state_dict(state)
    assert (extended.patience, extended.wait_count) == (4, 0)
    assert extended.best_score == state["best_score"]  # the best of the whole run is kept


# ------------------------------------------------------------------------------------------
# fine-tuning (model.init_from)


def test_fine_tuning_starts_from_the_source_weights(tiny_run, synth_data, tmp_path, monkeypatch):
    seen = {}
    original = SegModule.on_train_start

    def capture(self):
        seen.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        original(self)

    monkeypatch.setattr(SegModule, "on_train_start", capture)
    out = tmp_path / "ft"
    # encoder_weights names a missing file: with init_from it is not used (nor downloaded)
    cfg = tiny_config(**{"model.init_from": str(tiny_run), "train.epochs": 1,
                         "model.encoder_weights": str(tmp_path / "absent.pth")})  # fmt: skip
    fit(cfg, synth_data, out, progress=False)

    source = _ckpt(tiny_run / "best.ckpt")["state_dict"]
    assert set(seen) == {k.removeprefix("model.") for k in source}
    assert all(torch.equal(v, source[f"model.{k}"]) for k, v in seen.items())
    info = json.loads((out / "data.json").read_text())
    digest = hashlib.sha256((tiny_run / "best.ckpt").read_bytes()).hexdigest()
    assert info["init_from"] == {"source": str(tiny_run.resolve()),
                                 "checkpoint": str((tiny_run / "best.ckpt").resolve()),
                                 "sha256": digest}  # fmt: skip
    assert Run(out).config().model.init_from == str(tiny_run)
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1]
    ft = _ckpt(out / "last.ckpt")
    assert ft["epoch"] == 0 and ft["global_step"] == _steps_per_epoch(out)  # fresh counters


def test_fine_tuning_from_a_checkpoint_file_then_another_weights_dict(tiny_run, tmp_path):
    """A checkpoint file works as well; the module holds its weights right after setup."""
    from ptxseg.lightning_module import build_module
    from ptxseg.resume import load_init_weights

    ckpt = tmp_path / "weights.ckpt"
    shutil.copy(tiny_run / "best.ckpt", ckpt)
    cfg = tiny_config(**{"model.init_from": str(ckpt)})
    state, path, sha, normalization = load_init_weights(cfg)
    assert path == ckpt and sha == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert normalization.mean == (0.485, 0.456, 0.406)  # what the source trained with
    module = build_module(cfg, init_state=state, normalization=normalization)
    source = _ckpt(ckpt)["state_dict"]
    assert all(torch.equal(v, source[f"model.{k}"]) for k, v in module.model.state_dict().items())


@pytest.mark.parametrize("source", ["run", "file", "old-file", "missing", "run-without-best"])
def test_fine_tuning_refuses_another_architecture_or_no_source(
    tiny_run, synth_data, tmp_path, source
):
    if source == "run":
        init, error = str(tiny_run), ConfigError
        match = (f"model.init_from: {tiny_run} was trained with model.encoder=efficientnet-b0, "
                 "this run has model.encoder=efficientnet-b1")  # fmt: skip
    elif source == "file":  # a checkpoint says what it was trained with
        init, error = str(tmp_path / "w.ckpt"), ConfigError
        shutil.copy(tiny_run / "best.ckpt", init)
        match = (f"model.init_from: {init} was trained with model.encoder=efficientnet-b0, "
                 "this run has model.encoder=efficientnet-b1")  # fmt: skip
    elif source == "old-file":  # weights only (an older ptxseg): checked against this config
        from ptxseg.checkpoint import save_model_checkpoint
        from ptxseg.model import build_model

        init, error = str(tmp_path / "w.ckpt"), CheckpointError
        save_model_checkpoint(build_model(tiny_config().model, pretrained=False), init)
        match = f"model.init_from: {init}: does not match the config"
    elif source == "missing":
        init, error = str(tmp_path / "nope"), ConfigError
        match = f"model.init_from: {init}: no such run folder or checkpoint file"
    else:
        (tmp_path / "empty-run").mkdir()
        init, error = str(tmp_path / "empty-run"), CheckpointError
        match = f"model.init_from: {init}: run folder without best.ckpt"
    out = tmp_path / "ft"
    cfg = tiny_config(**{"model.init_from": init, "model.encoder": "efficientnet-b1"})
    with pytest.raises(error) as exc:
        fit(cfg, synth_data, out, progress=False)
    assert str(exc.value).startswith(match)
    assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------
# a run killed before its first last.ckpt (issue 10, item 19)


def _stranded(tiny_run, tmp_path):
    """A run folder as a kill around the first checkpoint leaves it: config, split, data.json,
    a best.ckpt and epoch 1 in metrics.csv, a temp file, but no last.ckpt."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "last.ckpt").unlink()
    rows = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(rows[:2]) + "\n")
    (run / ".last.ckpt.x1y2.tmp").write_bytes(b"PK half")
    return run


def test_resume_restarts_a_run_that_saved_no_checkpoint(tiny_run, synth_data, tmp_path,
                                                        monkeypatch, capsys):  # fmt: skip
    run = _stranded(tiny_run, tmp_path)
    split = (run / "split.csv").read_text()
    config = (run / "config.yaml").read_text()

    # the restart clears the failed start's outputs first (seen when it dies in epoch 1)
    def crash(self, trainer, pl_module):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunFiles, "on_validation_end", crash)
    with pytest.warns(UserWarning, match="restarting it from scratch"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(Run(run).config(), synth_data, run, resume=True, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data.json", "split.csv"]
    monkeypatch.undo()

    # the CLI: one warning line, then the whole run with its own config and split
    code = main(["train", "--data", str(synth_data), "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (
        f"warning: {run}: no last.ckpt (the run stopped before its first checkpoint): "
        "restarting it from scratch with its own config.yaml and split.csv"
    ) in err.splitlines()
    assert (run / "split.csv").read_text() == split and (run / "config.yaml").read_text() == config
    rows = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert _ckpt(run / "last.ckpt")["epoch"] == 2
    assert not list(run.glob(".*"))
    assert yaml.safe_load(config)["train"]["epochs"] == TINY_RUN_SETTINGS["train.epochs"]
