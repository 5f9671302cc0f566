"""ONNX export of a run's model (the ONNX Runtime backend: :mod:`ptxseg.onnx_runtime`).

The exported graph is the whole :class:`~ptxseg.model.SegModel` plus a sigmoid:

- input ``image``: float32 ``(N, 1, S, S)``, raw gray values 0..255, dynamic batch ``N``;
- output ``probs``: float32 ``(N, 1, S, S)``, pneumothorax probabilities.

Normalisation (``/255``, gray replicated to 3 channels, the model's own mean/std) happens
inside the graph, and the file's ``metadata_props`` carry everything a consumer needs to preprocess
(``ptxseg.input_size``, ``ptxseg.normalization``, ``ptxseg.resize``) and to know what it runs
(``ptxseg.arch``, ``ptxseg.encoder``, ``ptxseg.checkpoint_sha256``). The ONNX backend reads
nothing else from the run folder (post-processing thresholds still come from
``thresholds.json`` or ``--thresholds``).

The file is written only after parity is checked: the predictor's ONNX Runtime and PyTorch
backends (fp32, CPU) must agree within ``tolerance`` on the probabilities of a sample batch.
The output path is checked before anything else (:func:`check_export_out`): never the run's
config or checkpoint, never a folder, and an existing file only when it is a ptxseg export
itself (or with ``overwrite``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptxseg.errors import PtxsegError
from ptxseg.fileio import resolved, sha256_file, write_bytes
from ptxseg.onnx_runtime import DEFAULT_TOLERANCE, INPUT_NAME, OUTPUT_NAME, OnnxModel
from ptxseg.outputs import check_output_file
from ptxseg.run import Run

OPSET = 17
FORMAT_VERSION = "1"
RESIZE_RULE = (
    "resize the (H, W) gray image to (S, S) with cv2 INTER_AREA when shrinking, INTER_LINEAR "
    "when growing; resize probabilities back to (H, W) bilinearly"
)


class ProbsModel(nn.Module):
    """``sigmoid(model(x))``: the graph that is exported.

    Shape:
        - input: ``(N, 1, S, S)`` float32, values 0..255
        - output: ``(N, 1, S, S)`` float32 probabilities
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size: int
    max_abs_diff: float  # ONNX Runtime vs PyTorch probabilities on the sample batch
    tolerance: float
    exporter: str  # "torchscript" (dynamo=False) or "dynamo"
    seconds: float
    bytes: int


def model_metadata(model: nn.Module, size: int, **extra: str) -> dict[str, str]:
    """The ``metadata_props`` of an export: input size and the normalisation the graph applies
    (read from the model's own buffers), plus ``extra`` (arch, encoder, checkpoint...)."""
    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    norm = {
        "inside_graph": True,
        "input_range": [0, 255],
        "steps": "x / 255; gray replicated to 3 channels; (x - mean) / std per channel",
        "scale": 1.0 / 255.0,
        "channels": "gray replicated to 3 channels",
        "mean": None if mean is None else [float(v) for v in mean.flatten()],
        "std": None if std is None else [float(v) for v in std.flatten()],
    }
    meta = {
        "ptxseg.format": FORMAT_VERSION,
        "ptxseg.input_name": INPUT_NAME,
        "ptxseg.input": f"float32 (N, 1, {size}, {size}), gray values 0..255, N dynamic",
        "ptxseg.input_size": str(size),
        "ptxseg.output_name": OUTPUT_NAME,
        "ptxseg.output": f"float32 (N, 1, {size}, {size}), sigmoid probabilities",
        "ptxseg.normalization": json.dumps(norm),
        "ptxseg.resize": RESIZE_RULE,
    }
    meta.update({f"ptxseg.{k}": str(v) for k, v in extra.items()})
    return meta


def _torch_export(wrapper: nn.Module, sample: torch.Tensor, path: Path, opset: int) -> str:
    """Export with the TorchScript exporter (``dynamo=False``: simple, robust for CNNs), or
    with the dynamo exporter where the former is gone. Returns the exporter used."""
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer chatter, not user problems
        try:
            torch.onnx.export(
                wrapper,
                (sample,),
                str(path),
                dynamo=False,
                opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **kwargs,
            )
            return "torchscript"
        except (TypeError, NotImplementedError, RuntimeError) as first:
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    wrapper,
                    (sample,),
                    str(path),
                    dynamo=True,
                    opset_version=max(opset, 18),
                    dynamic_shapes={"x": {0: batch}},
                    external_data=False,
                    **kwargs,
                )
                return "dynamo"
            except Exception as exc:  # noqa: BLE001 - report both failures
                raise PtxsegError(
                    f"ONNX export failed (TorchScript exporter: {str(first).splitlines()[0]}; "
                    f"dynamo exporter: {str(exc).splitlines()[0] if str(exc) else exc!r})"
                ) from None


def sample_batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic float32 batch ``(n, 1, size, size)`` of values 0..255: noise and a
    smooth radiograph-like blob pattern, so parity is checked over varied activations."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        if i % 2 == 0:
            out[i, 0] = rng.integers(0, 256, (size, size))
        else:
            blob = np.exp(-((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.05)
            out[i, 0] = np.clip(40 + 150 * blob + 60 * yy + rng.normal(0, 8, (size, size)), 0, 255)
    return torch.from_numpy(np.rint(out))


def export_model(
    model: nn.Module,
    size: int,
    *,
    metadata: dict[str, str] | None = None,
    opset: int = OPSET,
    sample: torch.Tensor | None = None,
) -> tuple[bytes, str]:
    """Export a :class:`~ptxseg.model.SegModel`-like module (``(N,1,S,S)`` 0..255 -> logits)
    as ONNX bytes with a sigmoid output, a dynamic batch axis and ``metadata`` attached.

    Returns:
        ``(onnx_bytes, exporter)``.
    """
    import onnx

    model = model.eval().float().cpu()
    wrapper = ProbsModel(model).eval()
    sample = sample_batch(size) if sample is None else sample
    with tempfile.TemporaryDirectory(prefix="ptxseg-export-") as tmp:
        path = Path(tmp) / "export.onnx"
        with torch.no_grad():
            exporter = _torch_export(wrapper, sample, path, opset)
        proto = onnx.load(str(path), load_external_data=True)
    del proto.metadata_props[:]
    for key, value in (metadata or model_metadata(model, size)).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "ptxseg pneumothorax segmentation: image (N,1,S,S) 0..255 -> probs"
    proto.producer_name = "ptxseg"
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), exporter


def parity(model: nn.Module, onnx_model: bytes | str | Path, sample: torch.Tensor) -> float:
    """Largest absolute difference between the predictor's PyTorch (fp32, CPU) and ONNX
    Runtime (CPU) probabilities on ``sample`` ``(N, 1, S, S)`` (values 0..255)."""
    from ptxseg.predictor import Member, Predictor, TorchModel

    size = sample.shape[-1]
    x = sample.numpy().astype(np.uint8)
    torch_side = Member(TorchModel(model.float(), "cpu"), size)
    onnx_side = Member(OnnxModel(onnx_model, ["CPUExecutionProvider"], spin=True), size)
    expected = Predictor([torch_side]).batch_probs(x)
    got = Predictor([onnx_side]).batch_probs(x)
    if got.shape != expected.shape:
        raise PtxsegError(f"ONNX parity: output shape {got.shape} != PyTorch {expected.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))


def is_ptxseg_onnx(path: Path) -> bool:
    """Whether ``path`` is a regular file holding an ONNX model with ``ptxseg.*`` metadata."""
    import onnx

    from ptxseg.errors import DataError
    from ptxseg.fileio import open_regular

    try:
        with open_regular(path) as fh:
            proto = onnx.load_model_from_string(fh.read())
    except (DataError, OSError):
        return False
    except Exception:  # noqa: BLE001 - protobuf raises its own types on foreign bytes
        return False
    return any(p.key.startswith("ptxseg.") for p in proto.metadata_props)


def check_export_out(out: Path, inputs: list[Path], *, overwrite: bool = False) -> None:
    """Refuse, before any work, an ``--out`` that cannot or must not be written: a folder (or
    a FIFO, a symlink loop...), a missing or read-only folder, one of the export's own inputs
    (same file after resolving), or an existing file that is not a ptxseg ONNX export unless
    ``overwrite``.

    Raises:
        PtxsegError: naming ``out`` as the user gave it.
    """
    check_output_file(out, "--out", create_folder=True)
    if resolved(out) in {resolved(p) for p in inputs}:
        raise PtxsegError(f"{out}: --out is one of the export's inputs; refusing to overwrite it")
    if os.path.lexists(out) and not overwrite and not is_ptxseg_onnx(out):
        raise PtxsegError(
            f"{out}: exists and is not a ptxseg ONNX export; refusing to replace it "
            "(--overwrite to replace it)"
        )


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    which: str = "best",
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = OPSET,
    batch: int = 3,
    overwrite: bool = False,
) -> ExportResult:
    """Export the run's ``which`` checkpoint to ONNX (default: the run's ``model.onnx``) and
    check parity.

    Args:
        run_dir: a run folder (its checkpoint; its config only for an older checkpoint).
        out: the ONNX file to write.
        tolerance: the largest accepted ONNX Runtime vs PyTorch difference in probability; the
            file is not written when parity fails.
        batch: sample batch size for the parity check (differs from the export's batch of 2,
            so the dynamic batch axis is exercised too).
        overwrite: replace an existing ``out`` that is not a ptxseg export.

    Raises:
        ConfigError, CheckpointError: the run folder's config or checkpoint is unusable.
        PtxsegError: ``out`` cannot or must not be written (:func:`check_export_out`), the
            export fails or parity is above ``tolerance``.
    """
    from ptxseg import __version__

    t0 = time.perf_counter()
    run = Run.open(run_dir)
    out = Path(out) if out is not None else run.onnx_path
    ckpt = run.checkpoint(which)
    check_export_out(out, [run.config_path, ckpt], overwrite=overwrite)
    model, info = run.load_model(which)
    size = info.size
    meta = model_metadata(
        model,
        size,
        arch=info.model.arch,
        encoder=info.model.encoder,
        checkpoint=ckpt.name,
        checkpoint_sha256=sha256_file(ckpt),
        version=__version__,
    )
    data, exporter = export_model(model, size, metadata=meta, opset=opset)
    diff = parity(model, data, sample_batch(size, n=batch, seed=1))
    if not diff <= tolerance:
        raise PtxsegError(
            f"{out}: not written: ONNX Runtime and PyTorch probabilities differ by {diff:.3g} "
            f"(tolerance {tolerance:g})"
        )
    write_bytes(out, data)
    return ExportResult(
        path=out,
        size=size,
        max_abs_diff=diff,
        tolerance=tolerance,
        exporter=exporter,
        seconds=time.perf_counter() - t0,
        bytes=len(data),
    )
