"""``torch.compile`` for training: whether it pays (``train.compile``), what is compiled (the
repeated blocks, or the whole model), where the compiled code is cached, and what the user is
told while it happens.

**Whether** (:func:`decide`): ``false`` never, ``regional``/``whole`` always (``true`` =
``regional``, as older configs wrote it), ``auto`` only on CUDA and only when the planned
optimizer steps repay the compile twice over::

    planned steps x saving per step >= 2 x expected compile time

with the saving per step scaled by pixels per batch from the one measurement we have
(:data:`REFERENCE_SAVING_S`: an H200, bf16, channels_last, EfficientNet-B4 U-Net at 512 px,
batch 32: 250 images/s eager, 348 compiled, i.e. 128 ms -> 92 ms per step) and the expected
compile time :data:`COLD_COMPILE_S` (empty cache) or :data:`WARM_COMPILE_S` (this setup was
compiled before: the cache's ledger says so, :class:`Ledger`). Examples on an H200: the paper's
run on SIIM (320 steps x 300 epochs) compiles; 92 training images at batch 32 for 300 epochs
(600 steps x 36 ms = 22 s) does not.

**What** (:func:`compile_model`): ``regional`` compiles each element of the model's block
lists (:func:`repeated_blocks`: the MBConv blocks of smp's EfficientNet, the stages' blocks of
a timm ``tu-`` encoder, ResNet's basic blocks, the U-Net decoder's blocks), each with static
shapes; the stem, the normalisation and the head stay eager (torch's regional-compilation
recipe). Blocks of one class share one code object and dynamo keeps at most
``recompile_limit`` (8) compiled versions of a code object before it silently runs the rest
eagerly; the EfficientNet blocks differ in shapes, strides, expansion and stochastic-depth rate
(each block its own guard set: 32 for B4), so the limit is raised to the number of blocks that
share a code object (:func:`recompile_limit_needed`). ``whole`` compiles the whole network.

Validation runs eagerly (``torch.compiler.set_stance("force_eager")``, :class:`CompileStatus`):
eval mode changes BatchNorm, so compiling it would build and cache a second set of graphs for
a few forward passes per epoch. Lightning's sanity check is off (``num_sanity_val_steps=0``).

**Where** (:func:`cache_location`): the inductor's FX-graph and AOTAutograd caches are on and
live in a persistent folder: the user's own ``TORCHINDUCTOR_CACHE_DIR`` if set, else
``train.compile_cache``, else ``$XDG_CACHE_HOME/ptxseg/inductor`` (``~/.cache/ptxseg/inductor``).
A second run of the same setup (a resume, another fold) then loads the compiled code instead
of compiling it.

**Told** (:class:`CompileStatus`): one line before the first step (what is compiled, the
first-time cost, the cache and whether it holds this setup) and one after it (``first step
after 7.8 s (compile, warm cache)``), on the progress bar's console or as plain log lines.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from ptxseg.errors import ConfigError
from ptxseg.progress import duration, log_line, plural

#: ``train.compile``'s values (``true`` is read as ``regional``, ``false`` as off)
MODES = ("auto", "false", "regional", "whole")


#: seconds one optimizer step saves when compiled, for REFERENCE_PIXELS per batch (an H200,
#: bf16 + channels_last, U-Net/EfficientNet-B4, 512 px, batch 32: 128 ms eager, 92 compiled)
REFERENCE_SAVING_S = 0.036
REFERENCE_PIXELS = 32 * 512 * 512
#: expected time to the first compiled step with an empty cache, and with this setup cached
#: (regional compilation on a GPU; the targets of issue 11, see docs/benchmarks.md)
COLD_COMPILE_S = 60.0
WARM_COMPILE_S = 20.0
PAYBACK = 2.0  # the saving must repay the compile this many times over
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
LEDGER = "ptxseg-compiles.json"  # what ptxseg compiled into a cache folder, and how long it took


def parse_setting(setting: Any) -> str:
    """``train.compile``'s value as one of :data:`MODES` (``True`` = ``regional``)."""
    if setting is True:
        return "regional"
    if setting is False or setting is None:
        return "false"
    value = str(setting).lower()
    if value not in MODES:
        raise ConfigError(f"train.compile: unknown '{setting}' (valid: {', '.join(MODES)})")
    return value


def step_saving(batch_size: int, size: int) -> float:
    """Seconds a compiled step is expected to save (the reference, scaled by pixels/batch)."""
    return REFERENCE_SAVING_S * batch_size * size * size / REFERENCE_PIXELS


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` chose: ``mode`` (``off``, ``regional`` or ``whole``) and why."""

    mode: str
    reason: str

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def __str__(self) -> str:
        return f"compile: {self.mode} ({self.reason})"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 100 else duration(s)


def decide(
    setting: Any,
    device: str,
    *,
    planned_steps: int | None = None,
    batch_size: int = 32,
    size: int = 512,
    compiled_before: float | None = None,
) -> Decision:
    """Whether and how training compiles (see the module doc for the rule).

    Args:
        setting: ``train.compile`` (``auto``, ``false``, ``regional``, ``whole``, a bool).
        device: the resolved device type (``cuda``, ``cpu``, ``mps``).
        planned_steps: optimizer steps this process will run (``None``: unknown, ``auto``
            then compiles on CUDA).
        batch_size, size: images per step and their side, for the saving per step.
        compiled_before: seconds the first step took when this setup was compiled into the
            cache before (:meth:`Ledger.first_step`), else ``None`` (an empty cache).
    """
    mode = parse_setting(setting)
    if mode == "false":
        return Decision("off", "train.compile=false")
    if mode != "auto":
        return Decision(mode, f"train.compile={mode}")
    if device != "cuda":
        return Decision("off", f"auto: only on CUDA, this is {device}")
    if planned_steps is None:
        return Decision("regional", "auto: CUDA")
    saving = step_saving(batch_size, size)
    total = planned_steps * saving
    cost = WARM_COMPILE_S if compiled_before is not None else COLD_COMPILE_S
    cache = "warm cache" if compiled_before is not None else "empty cache"
    figures = (
        f"{planned_steps:,} planned steps x ~{saving * 1000:.0f} ms saved = ~{_seconds(total)}"
    )
    if total >= PAYBACK * cost:
        return Decision(
            "regional", f"auto: {figures} >= {PAYBACK:g} x ~{_seconds(cost)} to compile, {cache}"
        )
    return Decision(
        "off",
        f"auto: {figures} < {PAYBACK:g} x ~{_seconds(cost)} to compile, {cache}: would not pay",
    )


# ------------------------------------------------------------------------------------------
# the cache


@dataclass(frozen=True)
class CacheLocation:
    """The inductor cache folder and who chose it (``source``)."""

    path: Path
    source: str  # "TORCHINDUCTOR_CACHE_DIR", "train.compile_cache" or "default"

    def __str__(self) -> str:
        return str(self.path) + (f" (from {self.source})" if self.source != "default" else "")


_set_by_us: str | None = None  # the TORCHINDUCTOR_CACHE_DIR value ptxseg itself set


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/ptxseg/inductor``, else ``~/.cache/ptxseg/inductor``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ptxseg" / "inductor"


def torch_default_cache_dir() -> str:
    """Where the inductor caches when nobody says (``/tmp/torchinductor_USER``). Importing
    Lightning writes it into ``TORCHINDUCTOR_CACHE_DIR`` itself, so that value is not a
    user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    return os.path.abspath(torch_default())


def cache_location(setting: str | None, environ: Mapping[str, str] | None = None) -> CacheLocation:
    """The cache folder: the user's ``TORCHINDUCTOR_CACHE_DIR`` wins (not torch's own default,
    which importing Lightning writes there, nor the value ptxseg set), then the config's
    ``train.compile_cache``, then :func:`default_cache_dir`."""
    env = os.environ if environ is None else environ
    user = env.get(CACHE_ENV)
    if user and user not in (_set_by_us, torch_default_cache_dir()):
        return CacheLocation(Path(user), CACHE_ENV)
    if setting:
        return CacheLocation(Path(setting), "train.compile_cache")
    return CacheLocation(default_cache_dir(env), "default")


def use_cache(location: CacheLocation) -> None:
    """Point the inductor at ``location`` (the environment variable it reads, also seen by
    DataLoader workers and DDP processes started later) and turn its FX-graph and AOTAutograd
    caches on."""
    global _set_by_us
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    path = str(location.path.resolve())
    location.path.mkdir(parents=True, exist_ok=True)
    if location.source != CACHE_ENV:
        os.environ[CACHE_ENV] = path
        _set_by_us = path
    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True


class Ledger:
    """``ptxseg-compiles.json`` in the cache folder: for each setup ptxseg compiled there, the
    seconds its first step took. Says, before compiling, whether the cache holds this setup."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LEDGER

    def _read(self) -> dict[str, Any]:
        from ptxseg.errors import DataError
        from ptxseg.fileio import read_json

        try:
            data = read_json(self.path, "compile ledger")
        except DataError:
            return {}
        return data if isinstance(data, dict) else {}

    def first_step(self, key: str) -> float | None:
        entry = self._read().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("first_step_s"), int | float):
            return float(entry["first_step_s"])
        return None

    def record(self, key: str, seconds: float, warm: bool) -> None:
        from ptxseg.fileio import write_json

        data = self._read()
        old = data.get(key) if isinstance(data.get(key), dict) else {}
        entry = {"first_step_s": round(seconds, 1), "warm": warm}
        if warm and old.get("first_step_s") is not None:
            entry["cold_first_step_s"] = old.get("cold_first_step_s", old["first_step_s"])
        data[key] = entry
        try:
            write_json(self.path, data)
        except OSError:  # a read-only cache folder costs the next run its estimate only
            pass


def setup_key(cfg, device: str, mode: str) -> str:
    """What makes compiled code reusable: torch, the GPU, the model, the input shape and
    numerics. Runs that agree on it find their graphs in the cache."""
    import torch

    from ptxseg import hardware

    gpu = torch.cuda.get_device_name() if device == "cuda" else device
    return "|".join([
        f"torch {torch.__version__}", gpu, mode,
        f"{cfg.model.arch}/{cfg.model.encoder}", f"{cfg.data.size}px",
        f"batch {cfg.train.batch_size}",
        hardware.lightning_precision(cfg.train.precision, device),
        "channels_last" if hardware.resolve_switch(cfg.train.channels_last, device) else "nchw",
    ])  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """The compile of one training process: the decision, the cache and this setup's entry
    in the cache's ledger (``compiled_before``: seconds its first step took, else None)."""

    decision: Decision
    location: CacheLocation | None  # None: compile off, no cache looked at
    key: str
    compiled_before: float | None


def planned_steps(n_train: int, batch_size: int, epochs: int, processes: int = 1) -> int:
    """Optimizer steps one process runs for ``epochs`` epochs of ``n_train`` images (the
    training loader drops an incomplete last batch; DDP splits the images)."""
    per_process = -(-n_train // max(1, processes))
    return max(1, per_process // batch_size if per_process > batch_size else 1) * epochs


def plan(cfg, device: str, steps: int | None = None) -> Plan:
    """:func:`decide` for ``cfg`` on ``device`` with the cache's knowledge of this setup. A
    compile that stays off even with this setup in the cache (``false``, or ``auto`` where it
    cannot pay) looks at no cache: no folder, ledger or device query."""

    def decision(before: float | None) -> Decision:
        return decide(cfg.train.compile, device, planned_steps=steps,
                      batch_size=cfg.train.batch_size, size=cfg.data.size,
                      compiled_before=before)  # fmt: skip

    if not decision(0.0).on:  # off even at the cheapest (warm) compile
        return Plan(decision(None), None, "", None)
    location = cache_location(cfg.train.compile_cache)
    setting = parse_setting(cfg.train.compile)
    key = setup_key(cfg, device, "whole" if setting == "whole" else "regional")
    before = Ledger(location.path).first_step(key)
    return Plan(decision(before), location, key, before)


# ------------------------------------------------------------------------------------------
# what is compiled


def _containers():
    from torch import nn

    return (nn.ModuleList, nn.Sequential)


def repeated_blocks(model) -> list[tuple[str, Any]]:
    """The blocks regional compilation compiles: each element of a ``ModuleList`` or plain
    ``Sequential`` (searched through nested ones) whose class occurs at least twice in the
    model and that holds parameters and sub-modules (a block, not a single layer). Outside
    them (the stem, the normalisation, the head) everything stays eager.

    Returns ``(qualified name, module)`` pairs, outermost blocks only.
    """
    containers = _containers()
    counts = Counter(type(m) for m in model.modules())
    found: list[tuple[str, Any]] = []

    def is_block(m) -> bool:
        return (
            counts[type(m)] >= 2
            and next(m.children(), None) is not None
            and next(m.parameters(), None) is not None
        )

    def walk(prefix: str, module, in_list: bool) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if type(child) in containers:
                walk(full, child, True)
            elif in_list and is_block(child):
                found.append((full, child))
            else:
                walk(full, child, False)

    walk("", model, False)
    return found


def _code(module):
    forward = type(module).forward
    return getattr(forward, "__code__", forward)


def recompile_limit_needed(blocks) -> int:
    """The most blocks sharing one ``forward`` code object: each may need its own compiled
    version (shapes, strides, a per-block float such as the stochastic-depth rate)."""
    per_code = Counter(_code(m) for _name, m in blocks)
    return max(per_code.values(), default=0)


def raise_recompile_limits(blocks) -> tuple[int, int]:
    """Raise dynamo's per-code-object limit to :func:`recompile_limit_needed` (never lower it)
    and the total limit to the number of blocks, so that no block silently stays eager.
    Returns the two limits now in force."""
    import torch._dynamo.config as dynamo_config

    per_code = recompile_limit_needed(blocks)
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    total = (
        "accumulated_recompile_limit"
        if hasattr(dynamo_config, "accumulated_recompile_limit")
        else "accumulated_cache_size_limit"
    )
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), per_code))
    setattr(dynamo_config, total, max(getattr(dynamo_config, total), len(blocks)))
    return getattr(dynamo_config, name), getattr(dynamo_config, total)


@dataclass
class Compiled:
    """What :func:`compile_model` compiled: the mode and the blocks (regional)."""

    mode: str
    blocks: list[str] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        if self.mode == "whole":
            return "the whole network"
        kinds = ", ".join(f"{n} {k}" for k, n in self.classes.items())
        return f"{plural(len(self.blocks), 'repeated block')} ({kinds}; stem and head eager)"


def compile_model(model, mode: str, *, backend: str | None = None) -> Compiled:
    """Compile ``model`` in place (``Module.compile``: state_dict keys unchanged) as
    ``regional`` (each of :func:`repeated_blocks`) or ``whole``; static shapes (training
    drops an incomplete last batch). ``backend``: a dynamo backend (tests: ``"eager"``)."""
    kwargs: dict[str, Any] = {"dynamic": False}
    if backend is not None:
        kwargs["backend"] = backend
    if mode == "whole":
        model.compile(**kwargs)
        return Compiled("whole")
    if mode != "regional":
        raise ValueError(f"compile mode {mode!r}")
    blocks = repeated_blocks(model)
    raise_recompile_limits(blocks)
    for _name, block in blocks:
        block.compile(**kwargs)
    classes = Counter(type(m).__name__ for _n, m in blocks)
    return Compiled("regional", [n for n, _m in blocks], dict(classes))


def is_compiled(module) -> bool:
    """Whether ``module`` (or any sub-module) was compiled by :func:`compile_model`."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


# ------------------------------------------------------------------------------------------
# what the user is told


def cache_counts() -> tuple[int, int]:
    """Compiled graphs loaded from the cache and compiled afresh so far (FX graph cache and
    AOTAutograd cache, whichever saw more)."""
    from torch._dynamo.utils import counters

    fx = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    aot = (
        counters["aot_autograd"]["autograd_cache_hit"],
        counters["aot_autograd"]["autograd_cache_miss"],
    )
    return max(fx[0], aot[0]), max(fx[1], aot[1])


def warmth(hits: int, misses: int) -> str:
    """``warm cache``, ``cold cache`` or ``partly warm cache (h of n graphs cached)``."""
    if hits and not misses:
        return "warm cache"
    if not hits:
        return "cold cache"
    return f"partly warm cache ({hits} of {hits + misses} graphs cached)"


def status_line(what: str, location: CacheLocation, compiled_before: float | None) -> str:
    """The line shown before the first step: what is compiled, its first-time cost and the
    cache (whether it holds this setup)."""
    if compiled_before is not None:
        cost = f"this setup is in the cache (its first step took {compiled_before:.1f} s)"
    else:
        cost = (f"first time about {_seconds(COLD_COMPILE_S)} on a GPU, longer on a CPU; "
                f"about {_seconds(WARM_COMPILE_S)} once cached")  # fmt: skip
    return (
        f"compiling {what} for the training step (validation eager): {cost}; "
        f"cache {location}"
    )


def first_step_line(seconds: float, hits: int, misses: int) -> str:
    return f"first step after {seconds:.1f} s (compile, {warmth(hits, misses)})"


def say(trainer, text: str) -> None:
    """One line on the rich bar's console when it is drawn (above the bar), else on stderr."""
    bar = getattr(trainer, "progress_bar_callback", None)
    console = getattr(bar, "_console", None)
    if console is not None and getattr(bar, "is_enabled", False):
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        log_line(text)


class CompileStatus(Callback):
    """Tells the user about the compile (:func:`status_line`, :func:`first_step_line`),
    records the first step's time in the cache's :class:`Ledger`, and runs validation eagerly
    (``force_eager``: no second set of graphs for eval mode)."""

    def __init__(
        self,
        compiled: Compiled,
        location: CacheLocation,
        key: str,
        compiled_before: float | None = None,
        *,
        show: bool = True,
    ):
        self.compiled = compiled
        self.location = location
        self.key = key
        self.compiled_before = compiled_before
        self.show = show
        self._t0: float | None = None
        self._counts0 = (0, 0)
        self.first_step_s: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._counts0 = cache_counts()
        if self.show and trainer.is_global_zero:
            say(trainer, status_line(self.compiled.describe(), self.location,
                                     self.compiled_before))  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None or self.first_step_s is not None:
            return
        self.first_step_s = time.perf_counter() - self._t0
        hits, misses = (a - b for a, b in zip(cache_counts(), self._counts0, strict=True))
        if trainer.is_global_zero:
            if self.show:
                say(trainer, first_step_line(self.first_step_s, hits, misses))
            Ledger(self.location.path).record(self.key, self.first_step_s, bool(hits) and
                                              not misses)  # fmt: skip

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        import torch

        torch.compiler.set_stance("force_eager")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        import torch

        torch.compiler.set_stance("default")

    def on_exception(self, trainer, pl_module, exception) -> None:
        import torch

        torch.compiler.set_stance("default")


class AutotuneFullBatches(Callback):
    """cuDNN autotuning (``cudnn.benchmark``, on for CUDA training unless deterministic) only
    for batches of the training batch size, whose shapes repeat every step: the training
    loader drops an incomplete last batch, and validation's last batch (``n_val %
    batch_size`` images, once per epoch) runs on cuDNN's heuristics instead of autotuning
    every convolution of the network once more for a shape seen once an epoch."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._saved: bool | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:  # fmt: skip
        import torch

        if self._saved is None:
            self._saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self._saved and len(batch[0]) == self.batch_size

    def _restore(self) -> None:
        import torch

        if self._saved is not None:
            torch.backends.cudnn.benchmark = self._saved
            self._saved = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
