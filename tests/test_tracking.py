"""train.logger: Lightning's TensorBoard and MLflow loggers write into the run folder."""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ptxseg.config import load_config
from ptxseg.errors import ConfigError
from ptxseg.tracking import LogConfig, build_loggers, hyperparameters


class _Fake(L.LightningModule):
    """A couple of steps on random tensors; logs known values once per epoch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.lin(x).pow(2).mean()

    def on_train_epoch_end(self):
        self.log("val_iou", 0.25 + 0.5 * self.current_epoch)  # 0.25, 0.75
        self.log("val_dice", 0.125 * (self.current_epoch + 1))  # 0.125, 0.25

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(cfg, run, *, resume=False):
    loggers = build_loggers(cfg, run, resume=resume)
    trainer = L.Trainer(
        max_epochs=2, logger=loggers, callbacks=[LogConfig(cfg, resume=resume)],
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, default_root_dir=run,
    )
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer.fit(_Fake(), data)
    return loggers


def test_csv_adds_no_logger(tmp_path):
    assert build_loggers(load_config("paper"), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_event_files_in_the_run_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("paper", ["train.logger=tensorboard", "train.epochs=7"])
    run = tmp_path / "run"
    _fit(cfg, run)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(run) for p in run.rglob("*"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val_iou")] == [0.25, 0.75]
    assert [e.value for e in acc.Scalars("val_dice")] == [0.125, 0.25]
    hparams = (run / "tensorboard" / "hparams.yaml").read_text()
    assert "train.epochs: 7" in hparams and "loss.name: dice_bce" in hparams


def test_mlflow_local_store_in_the_run_folder(tmp_path):
    cfg = load_config("paper", ["train.logger=mlflow", "train.epochs=7"])
    run = tmp_path / "run"
    (logger,) = _fit(cfg, run)
    db = run / "mlflow.db"
    assert db.is_file()
    with closing(sqlite3.connect(db)) as con:
        metrics = con.execute(
            "SELECT key, value FROM metrics WHERE run_uuid = ? ORDER BY key, step",
            (logger.run_id,),
        ).fetchall()
        params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?",
                                  (logger.run_id,)).fetchall())
        name = con.execute("SELECT name FROM runs WHERE run_uuid = ?",
                           (logger.run_id,)).fetchone()[0]
    vals = {}
    for key, value in metrics:
        vals.setdefault(key, []).append(value)
    assert vals["val_iou"] == [0.25, 0.75] and vals["val_dice"] == [0.125, 0.25]
    assert params["train.epochs"] == "7" and params["train.logger"] == "mlflow"
    assert name == "run"
    # a resumed run continues the same MLflow run
    (again,) = _fit(cfg, run, resume=True)
    assert again.run_id == logger.run_id
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


@pytest.mark.parametrize(
    ("choice", "hidden", "package"),
    [
        ("tensorboard", ("tensorboard", "tensorboardX"), "tensorboard"),
        ("mlflow", ("mlflow",), "mlflow (or mlflow-skinny)"),
        ("mlflow", ("sqlalchemy",), "sqlalchemy"),
    ],
)
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, choice, hidden, package):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ConfigError) as exc:
        build_loggers(load_config("paper", [f"train.logger={choice}"]), tmp_path)
    assert str(exc.value) == (
        f"train.logger: '{choice}' needs the {package} package, which is not installed "
        "(pip install 'ptxseg[tracking]')"
    )
    assert list(tmp_path.iterdir()) == []


def test_logger_key_is_validated_and_hyperparameters_are_flat():
    with pytest.raises(ConfigError, match="'train.logger'.*'csv', 'tensorboard' or 'mlflow'"):
        load_config("paper", ["train.logger=wandb"])
    params = hyperparameters(load_config("paper", ["optim.lr=3e-4"]))
    assert params["optim.lr"] == 3e-4 and params["model.encoder"] == "efficientnet-b4"
    assert all("." in k and not isinstance(v, dict) for k, v in params.items())


# ---------------------------------------------------------------------------------------------
# through training: the files appear in the run folder, with the run's own epoch metrics


def _val_iou_rows(run):
    from ptxseg.plots import read_metrics
    from ptxseg.run import Run

    return [r["val_iou"] for r in read_metrics(Run(run).metrics_path)]


def test_a_training_run_writes_tensorboard_files_and_the_logger_may_change_on_resume(
    tmp_path, synth_data
):
    """A csv run resumed (extended) with train.logger=tensorboard: the key is resumable, and the
    event files hold the epoch the resume trained, equal to metrics.csv."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ptxseg.train import fit
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    fit(tiny_config(**{"train.epochs": 1}), synth_data, run, progress=False)
    assert not (run / "tensorboard").exists() and not (run / "mlflow.db").exists()
    cfg = tiny_config(**{"train.epochs": 2, "train.logger": "tensorboard"})
    fit(cfg, synth_data, run, resume=True, progress=False)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("val_iou")]
    assert logged == pytest.approx(_val_iou_rows(run)[1:], abs=1e-6)
    assert "train.logger: tensorboard" in (run / "tensorboard" / "hparams.yaml").read_text()


def test_a_training_run_writes_an_mlflow_store_continued_on_resume(tmp_path, synth_data):
    from ptxseg.train import fit
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    fit(tiny_config(**{"train.epochs": 1, "train.logger": "mlflow"}), synth_data, run,
        progress=False)  # fmt: skip
    fit(tiny_config(**{"train.epochs": 2, "train.logger": "mlflow"}), synth_data, run,
        resume=True, progress=False)  # fmt: skip
    with closing(sqlite3.connect(run / "mlflow.db")) as con:
        (run_id,) = [r[0] for r in con.execute("SELECT run_uuid FROM runs")]
        values = [v for (v,) in con.execute(
            "SELECT value FROM metrics WHERE key = 'val_iou' ORDER BY step")]  # fmt: skip
        params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?",
                                  (run_id,)).fetchall())
    assert values == pytest.approx(_val_iou_rows(run), abs=1e-6) and len(values) == 2
    assert params["train.epochs"] == "1"  # the first start's parameters stand
    assert params["model.encoder"] == "efficientnet-b0"
