"""One predictor for every stage that runs a trained model: tune, evaluate, predict and the
parity check of export.

A :class:`Predictor` holds one loaded model, or several of the same input size whose
probabilities it averages (an ensemble: the mean probability, each member applying the
test-time augmentation itself before the average), each on the torch or the ONNX Runtime
backend (:class:`Backend`). :meth:`Predictor.from_run` loads a run folder's model, a CV
folder's trained folds (:mod:`ptxseg.cv`), or any list of run folders, CV folders,
checkpoints and ONNX files (:func:`member_sources`). The hardware (device, precision,
``torch.compile``, batch size, reading workers) is resolved once, by :mod:`ptxseg.hardware`;
test-time augmentation by :mod:`ptxseg.tta`, the same for both backends. Three ways in:

- :meth:`Predictor.batch_probs`: a uint8 batch already at model size (a service that batches
  requests itself);
- :meth:`Predictor.image_probs`: gray images of any size in memory, probabilities back at each
  image's own size;
- :meth:`Predictor.file_probs`: image files, read and decoded in DataLoader workers overlapped
  with the model, in input order, memory constant in the number of files (only the batches in
  flight are held); an unreadable file is an item with its error, never an exception.

Probabilities are float32 sigmoid outputs at model resolution unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ptxseg import hardware
from ptxseg.choices import Choice
from ptxseg.errors import ConfigError
from ptxseg.run import Run
from ptxseg.tta import Tta, average

if TYPE_CHECKING:  # torch stays out of the import: the command line lists Backend without it
    from ptxseg.data.dataset import Item


class Backend(Choice):
    """The runtime a model runs on (``--backend``)."""

    TORCH = "torch"
    ONNX = "onnx"


class TorchModel:
    """A torch model on a device for prediction (eval mode, ``channels_last`` and autocast on
    CUDA, optionally compiled): the torch backend."""

    def __init__(self, model: Any, device: str = "cpu", *, compile: bool = False):
        self.device = device
        self.compiled = compile
        self.dtype = hardware.autocast_dtype(device)
        self.model = hardware.place_for_inference(model, device, compile=compile)

    def probs(self, x: Any, tta: str | Tta = Tta.NONE) -> np.ndarray:
        """Probabilities ``(B, S, S)`` float32 of a uint8 batch ``(B, 1, S, S)`` (numpy or
        tensor)."""
        import torch

        x = torch.as_tensor(x).to(self.device, non_blocking=True)
        if self.device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(
            self.device, dtype=self.dtype, enabled=self.dtype is not None
        ):
            p = average(lambda t: torch.sigmoid(self.model(t).float()), x, tta)
        return p.squeeze(1).float().cpu().numpy()


@dataclass
class Member:
    """One loaded model of a predictor: its backend object (``probs(x, tta)``), input size,
    the file it came from, a one-line description (recorded by predict) and its architecture
    and encoder where known (``ptxseg serve``'s ``/v1/model``)."""

    model: Any
    size: int
    path: Path | None = None
    description: str = ""
    run: Run | None = None  # the run folder it was loaded from (its split: its training ids)
    arch: str | None = None
    encoder: str | None = None


Models = str | Path | Sequence[str | Path] | None


def member_sources(
    run: Run, models: Models = None, backend: str | Backend = Backend.TORCH, which: str = "best"
) -> list[tuple[Run, Path]]:
    """The ``(run folder, model file)`` of each member a predictor loads.

    Without ``models``: ``run``'s own model (its ``best.ckpt``, ``last`` with ``which``, or
    its ``model.onnx``), or, for a CV folder, each trained fold's. With ``models`` (one or a
    list): each a run folder (its model), a CV folder (its folds') or a checkpoint / ONNX file
    (``run``'s config read only for a checkpoint that does not describe itself).

    Raises:
        RunDirError: a fold not trained, or a model listed twice.
    """
    from ptxseg.cv import is_cv_dir, trained_folds
    from ptxseg.errors import RunDirError

    backend = Backend.parse(backend, "--backend")
    if models is None or isinstance(models, (str, Path)):
        models = [] if models is None else [models]
    items = [Path(m) for m in models] or [run.path]
    out: list[tuple[Run, Path]] = []
    for item in items:
        if is_cv_dir(item):
            runs = trained_folds(item)[1]
        elif item.is_dir() or not models:  # (a missing run folder: its loader says so)
            runs = [Run(item)]
        else:
            out.append((run, item))
            continue
        for r in runs:
            out.append((r, r.onnx_path if backend is Backend.ONNX else r.checkpoint(which)))
    seen: dict[Path, Path] = {}
    for _, path in out:
        key = path.resolve()
        if key in seen:
            raise RunDirError(f"{path}: an ensemble member listed twice (also as {seen[key]})")
        seen[key] = path
    return out


def load_member(
    run: Run,
    backend: str | Backend = Backend.TORCH,
    *,
    model: str | Path | None = None,
    device: str = "auto",
    compile: bool | None = None,
    n_images: int = 0,
    which: str = "best",
) -> Member:
    """The model of a run folder (or of ``model``, a checkpoint or ONNX file) on a backend.

    torch: ``model`` or the run's ``best.ckpt`` (``last`` with ``which``), through the one
    checkpoint loader; onnx: ``model`` or the run's ``model.onnx`` (the config is not read:
    the file's metadata says how to preprocess). ``compile=None``: see
    :func:`ptxseg.hardware.inference_compile`.
    """
    backend = Backend.parse(backend, "--backend")
    hardware.parse_device(device)  # refused before any loading, on either backend
    if backend is Backend.ONNX:
        from ptxseg.onnx_runtime import OnnxModel, onnx_providers

        onnx = OnnxModel(model or run.onnx_path, onnx_providers(prefer_cuda=device != "cpu"))
        meta = onnx.metadata
        return Member(onnx, onnx.size, onnx.path, f"onnx {onnx.describe()}", run=run,
                      arch=meta.get("ptxseg.arch"), encoder=meta.get("ptxseg.encoder"))  # fmt: skip
    dev = hardware.resolve_device(device)
    net, info = run.load_model(which, checkpoint=model)
    do_compile = hardware.inference_compile(compile, dev, n_images)
    what = f"{info.describe()}, {hardware.describe(dev, compiled=do_compile)}"
    return Member(
        TorchModel(net, dev, compile=do_compile), info.size, info.path,
        f"torch {info.path} ({what})", run=run, arch=info.model.arch,
        encoder=info.model.encoder,
    )  # fmt: skip


class Predictor:
    """Probabilities from one model or an ensemble (see the module doc).

    Args:
        members: loaded models of the same input size (:func:`load_member`, or a
            :class:`Member` around any object with ``probs(x, tta)`` and ``device``).
        tta: test-time augmentation.
        batch_size: images per forward pass (default: :func:`ptxseg.hardware.inference_batch_size`).
        workers: image-reading processes of :meth:`file_probs` (default: one per core, <= 8).
    """

    def __init__(
        self,
        members: Sequence[Member],
        *,
        tta: str | Tta = Tta.NONE,
        batch_size: int | None = None,
        workers: int | None = None,
    ):
        if not members:
            raise ValueError("a predictor needs at least one model")
        sizes = sorted({m.size for m in members})
        if len(sizes) > 1:
            each = ", ".join(f"{m.path or f'member {i}'} {m.size} px"
                             for i, m in enumerate(members))  # fmt: skip
            raise ConfigError(
                f"ensemble members take different input sizes ({each}); an ensemble averages "
                "maps of one size"
            )
        self.members = list(members)
        self.size = sizes[0]
        self.tta = Tta.parse(tta, "--tta")
        self.device = str(getattr(members[0].model, "device", "cpu"))
        self.batch_size = hardware.inference_batch_size(batch_size, self.device)
        self.workers = hardware.inference_workers(workers)
        # compiled models keep static shapes: a short last batch is padded
        self.pad_to_batch = any(getattr(m.model, "compiled", False) for m in members)

    @classmethod
    def from_run(
        cls,
        run: str | Path | Run,
        *,
        backend: str | Backend = Backend.TORCH,
        model: Models = None,
        device: str = "auto",
        tta: str | Tta = Tta.NONE,
        batch_size: int | None = None,
        workers: int | None = None,
        compile: bool | None = None,
        n_images: int = 0,
        which: str = "best",
    ) -> Predictor:
        """The predictor of a run folder, a CV folder (its folds as one ensemble) or the
        models ``model`` lists (:func:`member_sources`; each loaded by :func:`load_member`)."""
        run = run if isinstance(run, Run) else Run(run)
        Tta.parse(tta, "--tta")  # refused before any loading
        members = [
            load_member(r, backend, model=path, device=device, compile=compile,
                        n_images=n_images, which=which)  # fmt: skip
            for r, path in member_sources(run, model, backend, which)
        ]
        return cls(members, tta=tta, batch_size=batch_size, workers=workers)

    @property
    def description(self) -> str:
        return "; ".join(m.description for m in self.members)

    def record(self) -> dict[str, Any]:
        """What the outputs record about the model(s): the member files, in order, and how
        their probabilities combine."""
        return {
            "members": [str(m.path) if m.path is not None else m.description
                        for m in self.members],  # fmt: skip
            "combine": "mean probability" if len(self.members) > 1 else "single model",
        }

    def batch_probs(self, x: Any) -> np.ndarray:
        """Probabilities ``(B, S, S)`` float32 of a uint8 batch ``(B, 1, S, S)`` at model size
        (numpy or tensor): an ensemble's are the mean of its members' (each with the TTA)."""
        n = x.shape[0]
        if self.pad_to_batch and n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *x.shape[1:]), dtype=np.uint8)
            x = np.concatenate([np.asarray(x), pad])
        probs = np.asarray(self.members[0].model.probs(x, self.tta), np.float32)
        if len(self.members) > 1:
            probs = probs.copy()  # a member may hand back an array it keeps
            for member in self.members[1:]:
                probs += member.model.probs(x, self.tta)
            probs /= np.float32(len(self.members))
        return probs[:n]

    def image_probs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probabilities of gray uint8 images ``(H, W)`` of any size, each back at its own
        size (bilinear), as :meth:`file_probs` computes them for files."""
        from ptxseg.data.resize import probs_to_native, resize_to

        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = np.stack([resize_to(np.asarray(img, np.uint8), self.size) for img in chunk])
            probs = self.batch_probs(x[:, None])
            out += [probs_to_native(p, *img.shape[:2]) for p, img in zip(probs, chunk, strict=True)]
        return out

    def file_probs(
        self, entries: Sequence[tuple[str, Path]], *, keep_image: bool = False,
        keep_header: bool = False,
    ) -> Iterator[tuple[Item, np.ndarray | None]]:
        """Yield ``(item, probs)`` in input order for ``(id, path)`` entries: ``probs`` a
        float32 (S, S) array, or ``None`` with ``item.error`` set for a file that could not be
        read. ``keep_image``: also hand back the native image as ``item.image`` (overlays);
        ``keep_header``: a DICOM's header as ``item.header`` (measures, DICOM SEG), from the
        same read."""
        from torch.utils.data import DataLoader

        from ptxseg.data.dataset import ImageDataset, collate_items

        loader = DataLoader(
            ImageDataset(entries, self.size, keep_image=keep_image, keep_header=keep_header),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_items,
            **hardware.loader_kwargs(self.device, self.workers, prefetch=2 if keep_image else 4),
        )
        for items, x in loader:
            probs = self.batch_probs(x)
            for item, p in zip(items, probs, strict=True):
                yield item, (None if item.error else p)
