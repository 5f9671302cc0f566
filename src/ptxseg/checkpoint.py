"""Checkpoints: read safely, self-describing, one loader for every stage.

Next to the weights (``state_dict``, keys ``model.*``) a checkpoint holds
``checkpoint["ptxseg"]`` (:func:`checkpoint_info`): the ``model`` config section, the input
``size``, the ``mean``/``std`` and the ptxseg ``version``, all plain types, so
:func:`load_checkpoint` (the one loader, always ``torch.load(weights_only=True)``) rebuilds the
model from the file alone. A checkpoint written before that carries the weights only: it loads
given its run's config (its ``config.yaml``), with ImageNet mean/std, which is what every model
of that time used.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from ptxseg.config import Config, ModelConfig
from ptxseg.errors import CheckpointError, DataError
from ptxseg.fileio import open_regular
from ptxseg.model import SegModel, build_model
from ptxseg.normalization import IMAGENET, Normalization
from ptxseg.weights import nonfinite

CHECKPOINT_FORMAT = 1  # of checkpoint["ptxseg"]
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy pickle format


def _is_onnx(path: Path, fh: IO[bytes], head: bytes) -> bool:
    """An ONNX model (a ModelProto: field 1, ir_version, comes first), by name or content
    (``fh``: the file, opened by :func:`~ptxseg.fileio.open_regular`)."""
    if path.suffix.lower() == ".onnx":
        return True
    if not head.startswith(b"\x08"):
        return False
    try:
        import onnx

        fh.seek(0)
        proto = onnx.load_model_from_string(fh.read())
    except Exception:  # noqa: BLE001 - anything that does not parse is not ONNX
        return False
    return len(proto.graph.node) > 0


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict, read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, empty, truncated or unsafe file (pickled objects that are not
            plain weights are refused, never executed), an ONNX model, a FIFO, a folder or
            anything else that is not a regular file, any other file.
    """
    path = Path(path)
    try:
        fh = open_regular(path)
    except DataError as exc:
        problem = "checkpoint not found" if exc.problem == "file not found" else exc.problem
        raise CheckpointError(f"{path}: {problem}") from None
    with fh:
        return _read_checkpoint(path, fh)


def _read_checkpoint(path: Path, fh: IO[bytes]) -> dict[str, Any]:
    try:
        head = fh.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise CheckpointError(f"{path}: truncated or not a checkpoint (empty file)")
    if not head.startswith(_TORCH_MAGIC):
        if _is_onnx(path, fh, head):
            raise CheckpointError(
                f"{path}: is an ONNX model, not a checkpoint (use --backend onnx)"
            )
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (ptxseg checkpoints are files written by "
            "torch.save)"
        )
    try:
        fh.seek(0)
        obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refusing to load: the checkpoint carries pickled objects that are not "
                "plain weights (loaded with weights_only=True)"
            ) from None
        raise CheckpointError(f"{path}: not a valid checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a ptxseg checkpoint (no state_dict)")
    return obj


def model_state_from_checkpoint(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """Extract SegModel weights from a Lightning checkpoint (keys ``model.*``), tolerating the
    ``_orig_mod.`` infix that ``torch.compile`` adds."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a ptxseg checkpoint (no state_dict)")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith("model."):
            continue
        key = key.removeprefix("model.").replace("_orig_mod.", "")
        out[key] = value
    if not out:
        raise CheckpointError(f"{path}: not a ptxseg checkpoint (no model weights)")
    return out


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run, a corrupt file), naming the
    checkpoint and the first bad tensor: no stage may compute from them."""
    bad = nonfinite(state)
    if bad is not None:
        key, n_bad = bad
        raise CheckpointError(
            f"{path}: refusing to load: weight '{key}' holds {n_bad} non-finite value"
            f"{'s' * (n_bad != 1)} (NaN or inf; the training diverged or the file is corrupt)"
        )


# ---------------------------------------------------------------------------------------------
# self-describing checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about its model (or, for an older one, its run's config).

    Args:
        model: the ``model`` config section the weights belong to.
        size: the square input size the model was trained at (``data.size``).
        normalization: the mean/std the model applies.
        version: the ptxseg version that wrote it (``None``: before checkpoints carried it).
        embedded: whether the file itself said all this.
    """

    path: Path
    model: ModelConfig
    size: int
    normalization: Normalization
    version: str | None = None
    embedded: bool = True

    def describe(self) -> str:
        return f"{self.model.arch}/{self.model.encoder}, {self.size} px"


def checkpoint_info(cfg: Config, model: SegModel) -> dict[str, Any]:
    """The ``checkpoint["ptxseg"]`` entries that make a checkpoint self-describing (plain
    types only: they load with ``weights_only=True``)."""
    from ptxseg import __version__

    norm = model.normalization
    return {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "model": cfg.model.model_dump(mode="json"),
        "size": cfg.data.size,
        "mean": list(norm.mean),
        "std": list(norm.std),
    }


def embedded_info(obj: dict, path: Path) -> CheckpointInfo | None:
    """What a checkpoint (read by :func:`read_checkpoint`) says of its model; ``None`` for one
    of an older ptxseg that carries the weights only."""
    meta = obj.get("ptxseg")
    if not isinstance(meta, dict) or "model" not in meta:
        return None  # weights only (written before checkpoints described themselves)
    try:
        known = {k: v for k, v in meta["model"].items() if k in ModelConfig.model_fields}
        return CheckpointInfo(
            path=path,
            model=ModelConfig.model_validate(known),
            size=int(meta["size"]),
            normalization=Normalization(
                tuple(float(v) for v in meta["mean"]),  # type: ignore[arg-type]
                tuple(float(v) for v in meta["std"]),  # type: ignore[arg-type]
            ),
            version=str(meta.get("version")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable model description in the checkpoint ({type(exc).__name__})"
        ) from None


def load_checkpoint(
    path: str | Path, config: Config | Callable[[], Config] | None = None
) -> tuple[SegModel, CheckpointInfo]:
    """The model of a checkpoint, on the CPU in eval mode, and what the checkpoint says of it:
    the one loader of every stage (tune, evaluate, predict, export, fine-tuning).

    Args:
        path: a checkpoint file (``best.ckpt``, ``last.ckpt`` or a copy anywhere).
        config: the run's config, or a function returning it (called only when needed): used
            only for a checkpoint without its own description (written by an older ptxseg).

    Raises:
        CheckpointError: missing, truncated or unsafe file, an ONNX model, weights that do not
            match the model settings, non-finite weights (:func:`check_finite`), or an older
            checkpoint without ``config``.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    state = model_state_from_checkpoint(obj, path)
    info = embedded_info(obj, path)
    if info is None:
        if config is None:
            raise CheckpointError(
                f"{path}: the checkpoint does not describe its model (written by an older "
                "ptxseg); load it from its run folder, whose config says what it is"
            )
        cfg = config() if callable(config) else config
        info = CheckpointInfo(path, cfg.model, cfg.data.size, IMAGENET, None, embedded=False)
    model = build_model(info.model, pretrained=False, normalization=info.normalization)
    _check_matches(model.state_dict(), state, info)
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    return model.eval(), info


def _check_matches(expected: dict, state: dict, info: CheckpointInfo) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    where = f"{info.path}: does not match the config"
    if missing or unexpected:
        sample = (missing or unexpected)[0]
        raise CheckpointError(
            f"{where} (model.arch={info.model.arch}, model.encoder={info.model.encoder}): "
            f"{len(missing)} missing and {len(unexpected)} unexpected weights, e.g. '{sample}'"
        )
    bad = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"{where} (model.encoder={info.model.encoder}): {len(bad)} weights of another "
            f"shape, e.g. '{bad[0]}' {tuple(state[bad[0]].shape)} vs "
            f"{tuple(expected[bad[0]].shape)}"
        )


def save_model_checkpoint(model: SegModel, path: str | Path, cfg: Config | None = None) -> None:
    """Save weights in the same layout as the training checkpoints (``state_dict`` with
    ``model.`` keys), described by ``cfg`` when given (:func:`checkpoint_info`), atomically.
    Used by tests and tools that build a run folder by hand."""
    from ptxseg.fileio import atomic_open

    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    obj: dict[str, Any] = {"state_dict": state}
    if cfg is not None:
        obj["ptxseg"] = checkpoint_info(cfg, model)
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
