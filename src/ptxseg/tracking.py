"""Experiment tracking through Lightning's loggers (``train.logger``).

The run's own ``metrics.csv`` (and ``curves.png``) are always written by the training loop;
``train.logger`` adds, in the run folder:

- ``csv``: nothing more (the default);
- ``tensorboard``: ``RUN/tensorboard/events.out.tfevents.*`` (Lightning's
  ``TensorBoardLogger``); view with ``tensorboard --logdir RUN/tensorboard``;
- ``mlflow``: a local MLflow store, no server: the SQLite database ``RUN/mlflow.db`` (runs,
  parameters, metrics) and ``RUN/mlruns/`` (artifacts), through Lightning's ``MLFlowLogger``;
  view with ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``. The experiment is
  ``ptxseg``, the MLflow run is named after the run folder, and a resumed run continues the
  MLflow run it started. (MLflow 3 refuses its older plain-file store ``mlruns/`` unless
  ``MLFLOW_ALLOW_FILE_STORE`` is set: the SQLite store is the local one it supports.)

Both need the ``tracking`` extra (``pip install 'ptxseg[tracking]'``: tensorboard,
mlflow-skinny and SQLAlchemy/Alembic for the SQLite store); a missing package is a one-line
:class:`~ptxseg.errors.ConfigError` naming it and the extra. The loggers receive what the
training module logs (``val_iou``, ``val_dice``, ``val_loss``, ``train_loss`` per epoch) and,
through :class:`LogConfig`, the resolved config as hyperparameters (dotted keys).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from ptxseg.config import Config
from ptxseg.errors import ConfigError

LOGGERS = ("csv", "tensorboard", "mlflow")
EXTRA = "pip install 'ptxseg[tracking]'"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlruns"
EXPERIMENT = "ptxseg"


def _require(logger: str, modules: tuple[str, ...], package: str) -> None:
    """Import the first of ``modules`` that exists, else a one-line ConfigError."""
    for name in modules:
        try:
            importlib.import_module(name)
            return
        except ImportError:
            continue
    raise ConfigError(
        f"train.logger: '{logger}' needs the {package} package, which is not installed "
        f"({EXTRA})"
    )


def mlflow_uri(run_dir: str | Path) -> str:
    """The tracking URI of a run folder's MLflow store (``sqlite:////abs/RUN/mlflow.db``)."""
    return "sqlite:///" + (Path(run_dir).resolve() / MLFLOW_DB).as_posix()


def _existing_mlflow_run(uri: str, run_name: str) -> str | None:
    """The id of the latest MLflow run named ``run_name`` in the store (a resumed run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{run_name.replace(chr(39), '')}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def build_loggers(cfg: Config, run_dir: str | Path, *, resume: bool = False) -> list[Any]:
    """The Lightning loggers ``train.logger`` asks for (``[]`` for ``csv``): give them to
    ``Trainer(logger=...)`` (an empty list: no logger; the run's metrics.csv is written
    anyway). ``resume``: continue the MLflow run of an earlier start of this run folder.

    Raises:
        ConfigError: an unknown ``train.logger``, or the package it needs is missing.
    """
    choice = cfg.train.logger
    run_dir = Path(run_dir)
    if choice == "csv":
        return []
    if choice == "tensorboard":
        _require(choice, ("tensorboard", "tensorboardX"), "tensorboard")
        from lightning.pytorch.loggers import TensorBoardLogger

        return [
            TensorBoardLogger(
                save_dir=run_dir, name=TENSORBOARD_DIR, version="", default_hp_metric=False
            )
        ]
    if choice == "mlflow":
        _require(choice, ("mlflow",), "mlflow (or mlflow-skinny)")
        _require(choice, ("sqlalchemy",), "sqlalchemy")
        _require(choice, ("alembic",), "alembic")
        from lightning.pytorch.loggers import MLFlowLogger

        for name in ("mlflow", "alembic"):  # "creating tables..." info lines
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = mlflow_uri(run_dir)
        run_name = run_dir.resolve().name
        run_id = None
        if resume and (run_dir / MLFLOW_DB).is_file():
            run_id = _existing_mlflow_run(uri, run_name)
        return [
            MLFlowLogger(
                experiment_name=EXPERIMENT,
                run_name=run_name,
                tracking_uri=uri,
                artifact_location=(run_dir.resolve() / MLFLOW_ARTIFACTS).as_uri(),
                run_id=run_id,
            )
        ]
    raise ConfigError(f"train.logger: unknown '{choice}' (valid: {', '.join(LOGGERS)})")


def recorded(cfg: Config, run_dir: str | Path) -> bool:
    """Whether the run folder already holds a record of ``train.logger`` from an earlier start
    (TensorBoard's ``hparams.yaml``, an MLflow run of this name): a resume then continues it
    and leaves its parameters as they were (:class:`LogConfig`)."""
    run_dir = Path(run_dir)
    if cfg.train.logger == "tensorboard":
        return (run_dir / TENSORBOARD_DIR / "hparams.yaml").is_file()
    if cfg.train.logger == "mlflow" and (run_dir / MLFLOW_DB).is_file():
        return _existing_mlflow_run(mlflow_uri(run_dir), run_dir.resolve().name) is not None
    return False


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat dotted keys (``train.epochs``...): what the loggers record
    as the run's parameters."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(cfg.to_dict())


class LogConfig(Callback):
    """Records the config in every logger of the trainer when fitting starts (rank 0).

    ``resume``: nothing is recorded (the parameters of the run's first start stand; MLflow
    refuses to change a parameter's value, and an extension changes ``train.epochs``)."""

    def __init__(self, cfg: Config, *, resume: bool = False):
        self.params = hyperparameters(cfg)
        self.resume = resume

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not self.resume:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.params)
