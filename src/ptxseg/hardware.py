"""The hardware a model trains or predicts on, resolved in one place: the device, the numeric
precision, ``torch.compile`` and ``channels_last``, batch sizes, worker processes and the
DataLoader settings that follow from them.

Training (:mod:`ptxseg.train`) and prediction (:mod:`ptxseg.predictor`) both call these
functions; neither decides anything about the hardware itself. Torch is imported inside the
functions, so the command line can list :class:`Device` without loading it.

Rules:

- device ``auto``: CUDA when available, else Apple's MPS, else the CPU; ``cuda`` (or ``gpu``,
  Lightning's name) when CUDA is missing is an error naming the option;
- precision ``auto``: bf16 autocast on a GPU that has it, fp16 on older GPUs, fp32 elsewhere
  (:func:`autocast_dtype`; Lightning's precision string is derived from it);
- ``channels_last`` ``auto``: on with CUDA; prediction compiles only on CUDA for at least
  :data:`COMPILE_MIN_IMAGES` images (the warm-up pays off on large folders only); training's
  compile: :mod:`ptxseg.compilation`;
- prediction batch: :data:`INFERENCE_BATCH` images on CUDA, :data:`CPU_BATCH` elsewhere;
  reading workers: one per core, at most :data:`MAX_INFERENCE_WORKERS`;
- training workers: this process's share of the cores minus one, at most 16; workers start
  with ``forkserver`` on CUDA, ``fork`` elsewhere (:func:`worker_start_method`).
"""

from __future__ import annotations

import os
from typing import Any

from ptxseg.choices import Choice
from ptxseg.errors import ConfigError


class Device(Choice):
    """Where a model runs (``--device``, ``train.accelerator``)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


#: ``train.accelerator`` also takes Lightning's name ``gpu`` for ``cuda``
ACCELERATOR_CHOICES = (*Device.values(), "gpu")
INFERENCE_BATCH = 32  # images per forward pass on a GPU
CPU_BATCH = 4  # ... and on the CPU (or MPS)
MAX_INFERENCE_WORKERS = 8
COMPILE_MIN_IMAGES = 1000  # torch.compile warm-up pays off only on large folders (CUDA)


def parse_device(setting: str, option: str = "--device") -> Device:
    """The :class:`Device` of a setting (``gpu``: Lightning's name for ``cuda``)."""
    return Device.parse("cuda" if setting == "gpu" else setting, option)


def resolve_device(setting: str = "auto", option: str = "--device") -> str:
    """The device type a setting stands for: ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Raises:
        PtxsegError: an unknown setting; ConfigError: ``cuda``/``gpu`` without CUDA.
    """
    import torch

    device = parse_device(setting, option)
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError(f"{option}: '{setting}' requested but CUDA is not available")
    if device is not Device.AUTO:
        return device.value
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def autocast_dtype(device: str):
    """bf16 where the GPU supports it, fp16 on older GPUs, none (fp32) elsewhere."""
    import torch

    if device != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lightning_precision(setting: str, device: str) -> str:
    """Lightning's ``precision`` for ``train.precision``: ``auto`` follows
    :func:`autocast_dtype` (``bf16-mixed``, ``16-mixed`` or ``32-true``)."""
    if setting != "auto":
        return "32-true" if setting == "32" else setting
    dtype = autocast_dtype(device)
    if dtype is None:
        return "32-true"
    return "bf16-mixed" if str(dtype) == "torch.bfloat16" else "16-mixed"


def resolve_switch(setting: Any, device: str) -> bool:
    """``auto`` -> on with CUDA (``train.channels_last``)."""
    return device == "cuda" if setting == "auto" else bool(setting)


def device_count(devices: int | str, device: str) -> int:
    """``train.devices``: ``auto`` = every GPU (1 elsewhere)."""
    if devices == "auto":
        import torch

        return torch.cuda.device_count() if device == "cuda" else 1
    return int(devices)


def cores() -> int:
    """The CPU cores this process may run on (its affinity: containers, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def training_workers(setting: int | None, processes: int) -> int:
    """``data.workers`` or, when null, this process's share of the CPU cores minus one (for
    the training loop itself), at most 16: decoding 1024 px PNGs takes ~25 ms per image and
    core, so a fast GPU needs every core (or a ``ptxseg prepare`` copy)."""
    if setting is not None:
        return setting
    return max(1, min(16, cores() // max(1, processes) - 1))


def inference_workers(setting: int | None = None) -> int:
    """Image-reading processes for prediction: ``setting``, else one per core (at most 8)."""
    return min(MAX_INFERENCE_WORKERS, cores()) if setting is None else setting


def inference_batch_size(setting: int | None, device: str) -> int:
    """Images per forward pass: ``setting``, else :data:`INFERENCE_BATCH` on CUDA and
    :data:`CPU_BATCH` elsewhere."""
    if setting is not None:
        if setting < 1:
            raise ConfigError(f"--batch-size: must be at least 1 (got {setting})")
        return setting
    return INFERENCE_BATCH if device == "cuda" else CPU_BATCH


def inference_compile(setting: bool | None, device: str, n_images: int) -> bool:
    """``torch.compile`` for prediction: ``setting``, else on CUDA for at least
    :data:`COMPILE_MIN_IMAGES` images."""
    if setting is not None:
        return bool(setting)
    return device == "cuda" and n_images >= COMPILE_MIN_IMAGES


#: what a forkserver imports once, before forking DataLoader workers from it (each worker
#: then starts with torch, OpenCV and albumentations loaded instead of importing them itself)
FORKSERVER_PRELOAD = ["ptxseg.data.dataset", "ptxseg.augment"]


def worker_start_method(device: str) -> str | None:
    """How DataLoader workers start: ``forkserver`` with CUDA (forking a process that holds a
    CUDA context and its threads may deadlock; Python 3.12 warns "This process is
    multi-threaded, use of fork() may lead to deadlocks in the child"), ``fork`` elsewhere on
    POSIX (cheapest; OpenCV's thread pool is handled in the worker,
    :func:`ptxseg.data.dataset.worker_init`), ``None`` where fork does not exist (the
    platform's ``spawn``). docs/benchmarks.md: the cost of each."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if "fork" not in methods:
        return None
    return "forkserver" if device == "cuda" and "forkserver" in methods else "fork"


def _context(method: str | None):
    import multiprocessing

    if method is None:
        return None
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once it runs
    return context


def loader_kwargs(
    device: str, workers: int, *, prefetch: int = 4, persistent: bool = False,
    start_method: str | None = "auto",
):  # fmt: skip
    """The ``DataLoader`` arguments that depend on the hardware: worker processes, how they
    start (``start_method``: ``auto`` = :func:`worker_start_method`), pinned memory on
    CUDA, prefetching and worker persistence."""
    method = worker_start_method(device) if start_method == "auto" else start_method
    return {
        "num_workers": workers,
        "pin_memory": device == "cuda",
        "prefetch_factor": prefetch if workers else None,
        "persistent_workers": persistent and workers > 0,
        "multiprocessing_context": _context(method) if workers else None,
    }


def place_for_inference(model, device: str, *, compile: bool = False):
    """A model moved to ``device`` for prediction: eval mode, ``channels_last`` on CUDA (the
    layout the bf16 tensor cores want) and, with ``compile``, ``torch.compile`` with static
    shapes (the caller pads a short last batch)."""
    import torch

    model = model.eval().to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=False)
    return model


def describe(device: str, *, compiled: bool = False) -> str:
    """``"cuda, bfloat16 autocast, channels_last, compiled"``: what prediction runs with."""
    what = device
    dtype = autocast_dtype(device)
    if dtype is not None:
        what += f", {str(dtype).removeprefix('torch.')} autocast, channels_last"
    return what + (", compiled" if compiled else "")
