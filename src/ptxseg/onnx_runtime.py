"""ONNX Runtime: the ``onnx`` backend of prediction (:class:`OnnxModel`), CUDA first where
ONNX Runtime has it, else the CPU.

An export (``ptxseg export``) is self-describing: everything needed to preprocess comes from the
file's ``metadata_props`` (``ptxseg.input_size``, the input and output names; the normalisation
happens inside the graph), so the ONNX backend reads nothing else from a run folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptxseg.errors import CheckpointError
from ptxseg.tta import Tta, average

INPUT_NAME = "image"
OUTPUT_NAME = "probs"
#: the largest accepted ONNX Runtime vs PyTorch gap in probability of an export
DEFAULT_TOLERANCE = 1e-4


def onnx_providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA first where ONNX Runtime has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if prefer_cuda else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def session(model: bytes | str | Path, providers: list[str] | None = None, spin: bool = True):
    """An ONNX Runtime session. ``spin=False`` stops idle intra-op threads from busy-waiting,
    which leaves the CPU to the reading and writing threads that share it during prediction
    (about 10% more images/s on 2 cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=providers or onnx_providers())


def _read_model(path: Path) -> bytes:
    """The bytes of an ONNX file (a regular file: :func:`ptxseg.fileio.read_bytes`; ptxseg's
    exports keep their weights inside the file)."""
    from ptxseg.errors import DataError
    from ptxseg.fileio import read_bytes

    try:
        return read_bytes(path, "ONNX model", limit=None)
    except DataError as exc:
        if exc.problem == "file not found":
            raise CheckpointError(
                f"{path}: ONNX model not found (create it with `ptxseg export RUN`, or pass "
                "--model FILE)"
            ) from None
        raise CheckpointError(str(exc)) from None


class OnnxModel:
    """An exported model on ONNX Runtime: a backend of :class:`ptxseg.predictor.Predictor`.

    Args:
        path: the ``.onnx`` file, or its bytes (an export not yet written).
        providers: ONNX Runtime execution providers (default: :func:`onnx_providers`).
        spin: let idle intra-op threads busy-wait (off: see :func:`session`).
    """

    device = "cpu"  # batches are handed over as host numpy arrays

    def __init__(
        self, path: str | Path | bytes, providers: list[str] | None = None, spin: bool = False
    ):
        source = path
        self.path = Path("<in memory>") if isinstance(path, bytes) else Path(path)
        if not isinstance(path, bytes):
            source = _read_model(self.path)
        try:
            self.session = session(source, providers, spin=spin)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise CheckpointError(
                f"{self.path}: not a readable ONNX model ({type(exc).__name__}: {first})"
            ) from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.size = self._size()
        self.input_name = self.metadata.get("ptxseg.input_name", INPUT_NAME)
        self.output_name = self.metadata.get("ptxseg.output_name", OUTPUT_NAME)
        names = [i.name for i in self.session.get_inputs()]
        if self.input_name not in names:
            raise CheckpointError(f"{self.path}: no input named '{self.input_name}' ({names})")
        self.providers = self.session.get_providers()

    def _size(self) -> int:
        raw = self.metadata.get("ptxseg.input_size")
        if raw is None:
            raise CheckpointError(
                f"{self.path}: not a ptxseg export (no ptxseg.input_size metadata); "
                "create it with `ptxseg export RUN`"
            )
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if size <= 0:
            raise CheckpointError(f"{self.path}: bad ptxseg.input_size metadata {raw!r}")
        return size

    def describe(self) -> str:
        arch = self.metadata.get("ptxseg.arch", "?")
        enc = self.metadata.get("ptxseg.encoder", "?")
        return f"{self.path} ({arch}/{enc}, {self.size} px, {self.providers[0]})"

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return out[:, 0].astype(np.float32, copy=False)

    def probs(self, x, tta: str | Tta = Tta.NONE) -> np.ndarray:
        """Probabilities ``(B, S, S)`` float32 of a batch ``(B, 1, S, S)`` of 0..255 values
        (numpy, or a CPU tensor), with test-time augmentation (:func:`ptxseg.tta.average`)."""
        x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        return average(self._run, x, tta)
