"""Training throughput: the project's loop against a bare training step, in one process.

Figures (one JSON line each on stdout):

- ``bare_step``: the same model, loss and optimizer (``ptxseg.lightning_module.build_module`` +
  Adam, the config's precision / channels_last / compile) on random uint8 tensors already on
  the device;
  images/s after warm-up, synchronised at the start, middle and end of the timed window;
- ``project_loop``: the project's own loop, a Lightning ``Trainer`` with the run's hardware
  settings (``ptxseg.trainer.hardware_kwargs``) fed by ``ptxseg.train.make_loader`` (DataLoader
  workers decoding real files from ``--data``, resizing, the paper's augmentations), same
  window; ``images_per_s_second_half`` excludes what the loader had buffered before the window;
- ``loop_over_bare``: the ratio of the two (second-half rate of the loop, the conservative one)
  and ``siim_epoch_s``: 10,240 images at the loop's rate;
- ``pipeline_per_worker``: the data pipeline alone in one process (one worker's share): decode
  image + mask, resize to ``--size``, augment; per stage ms and images/s, for the files of
  ``--data`` and (``--prepared``) for a ``ptxseg prepare`` copy at ``--size``.

Usage::

    python benchmarks/train_throughput.py --data ../shared/data/siim-sample \\
        [--config paper] [--size 512] [--batch 32] [--steps 120] [--warmup 10] \\
        [--device auto|cpu|cuda] [--workers N] [--encoder efficientnet-b4] \\
        [--only bare,loop,pipeline] [--pipeline-images 40] [--prepared] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rates(t0: float, t_mid: float, t_end: float, steps: int, batch: int) -> dict:
    half = steps - steps // 2
    return {
        "images_per_s": steps * batch / (t_end - t0),
        "images_per_s_second_half": half * batch / (t_end - t_mid),
        "ms_per_step": 1000 * (t_end - t0) / steps,
    }


# ------------------------------------------------------------------------------------------


def bare_step(cfg, steps: int, warmup: int) -> dict:
    from ptxseg.lightning_module import build_module
    from ptxseg.trainer import hardware_kwargs

    hw = hardware_kwargs(cfg)
    device = torch.device("cuda" if hw["accelerator"] == "cuda" else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    module = build_module(cfg, pretrained=False).to(device).train()
    opt = torch.optim.Adam(module.model.parameters(), lr=cfg.optim.lr, fused=device.type == "cuda")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(hw["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=hw["precision"] == "16-mixed")
    b, s = cfg.train.batch_size, cfg.data.size
    x = torch.randint(0, 256, (b, 1, s, s), dtype=torch.uint8, device=device)
    y = (torch.rand((b, 1, s, s), device=device) < 0.05).to(torch.uint8)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = module.loss_fn(module(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        if i == steps // 2:
            _sync(device)
            t_mid = time.perf_counter()
        step()
    _sync(device)
    t_end = time.perf_counter()
    return _rates(t0, t_mid, t_end, steps, b)


def project_loop(cfg, records, steps: int, warmup: int) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ptxseg.lightning_module import build_module
    from ptxseg.train import make_loader
    from ptxseg.trainer import QUIET_TRAINER, hardware_kwargs, quiet_lightning

    hw = {**hardware_kwargs(cfg), "devices": 1, "num_nodes": 1, "strategy": "auto"}
    device = torch.device("cuda" if hw["accelerator"] == "cuda" else "cpu")
    need = (warmup + steps + 1) * cfg.train.batch_size
    records = (records * (need // len(records) + 1))[:need]  # one epoch covers the window
    marks: dict[str, float] = {}

    class Window(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            done = trainer.global_step
            for name, at in (("t0", warmup), ("t_mid", warmup + steps // 2),
                             ("t_end", warmup + steps)):  # fmt: skip
                if done == at:
                    _sync(device)
                    marks[name] = time.perf_counter()

    with quiet_lightning():
        module = build_module(cfg, pretrained=False)
        loader = make_loader(cfg, records, train=True, device=hw["accelerator"])
        trainer = L.Trainer(
            **hw,
            **QUIET_TRAINER,
            max_steps=warmup + steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            callbacks=[Window()],
        )
        trainer.fit(module, train_dataloaders=loader)
    out = _rates(marks["t0"], marks["t_mid"], marks["t_end"], steps, cfg.train.batch_size)
    out["workers"] = loader.num_workers
    out["prefetched_batches"] = loader.num_workers * (loader.prefetch_factor or 0)
    return out


def pipeline_per_worker(cfg, records, n: int) -> dict:
    """The work of one DataLoader worker, stage by stage, in this process (single thread)."""
    import cv2

    from ptxseg.augment import apply, build_train_transform
    from ptxseg.data.imageio import read_image, read_mask
    from ptxseg.data.resize import resize_mask, resize_to

    cv2.setNumThreads(1)  # as in a worker (ptxseg.data.dataset.worker_init)
    transform = build_train_transform(cfg.augment, cfg.train.seed)
    size = cfg.data.size
    t = {"decode": 0.0, "resize": 0.0, "augment": 0.0}
    picked = [records[i % len(records)] for i in range(n)]
    native = set()
    for rec in picked:
        t0 = time.perf_counter()
        image = read_image(rec.image)
        mask = read_mask(rec.mask, image.shape[:2])
        t1 = time.perf_counter()
        shape = f"{image.shape[1]}x{image.shape[0]}"
        image, mask = resize_to(image, size), resize_mask(mask, size)
        t2 = time.perf_counter()
        if transform is not None:
            apply(transform, image, mask)
        t3 = time.perf_counter()
        t["decode"] += t1 - t0
        t["resize"] += t2 - t1
        t["augment"] += t3 - t2
        native.add(shape)
    total = sum(t.values())
    return {
        "native": sorted(native),
        **{f"{k}_ms": 1000 * v / n for k, v in t.items()},
        "images_per_s": n / total,
        "images": n,
    }


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="dataset folder (any layout)")
    ap.add_argument("--layout", default="auto")
    ap.add_argument("--config", default="paper")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=120, help="timed steps")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps (compile, cudnn)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: auto)")
    ap.add_argument("--encoder", default=None, help="override model.encoder")
    ap.add_argument("--only", default="bare,loop,pipeline")
    ap.add_argument("--pipeline-images", type=int, default=40)
    ap.add_argument("--prepared", action="store_true", help="also time a prepared copy")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    from ptxseg.compilation import decide
    from ptxseg.config import load_config
    from ptxseg.data.sources import load_records
    from ptxseg.hardware import resolve_switch
    from ptxseg.trainer import hardware_kwargs

    sets = [
        f"data.size={args.size}",
        f"train.batch_size={args.batch}",
        f"train.accelerator={'auto' if args.device == 'auto' else args.device}",
        "model.encoder_weights=null",
        f"data.layout={args.layout}",
        *([f"data.workers={args.workers}"] if args.workers is not None else []),
        *([f"model.encoder={args.encoder}"] if args.encoder else []),
        *args.sets,
    ]
    cfg = load_config(args.config, sets)
    hw = hardware_kwargs(cfg)
    common = {
        **machine(),
        "device": hw["accelerator"],
        "precision": hw["precision"],
        "compile": decide(cfg.train.compile, hw["accelerator"]).mode,  # off/regional/whole
        "channels_last": resolve_switch(cfg.train.channels_last, hw["accelerator"]),
        "encoder": cfg.model.encoder,
        "size": cfg.data.size,
        "batch": cfg.train.batch_size,
    }
    only = set(args.only.split(","))
    records, _ = load_records(args.data, args.layout)
    results = {}
    if "bare" in only:
        results["bare"] = bare_step(cfg, args.steps, args.warmup)
        emit({"figure": "bare_step", **common, "steps": args.steps, **results["bare"]})
    if "loop" in only:
        results["loop"] = project_loop(cfg, records, args.steps, args.warmup)
        emit({"figure": "project_loop", **common, "steps": args.steps, "data": str(args.data),
              **results["loop"]})  # fmt: skip
    if "bare" in results and "loop" in results:
        loop_rate = min(results["loop"]["images_per_s"],
                        results["loop"]["images_per_s_second_half"])  # fmt: skip
        emit({"figure": "loop_over_bare", **common,
              "value": loop_rate / results["bare"]["images_per_s"],
              "siim_epoch_s": 10240 / loop_rate})  # fmt: skip
    if "pipeline" in only:
        emit({"figure": "pipeline_per_worker", **common, "source": str(args.data),
              **pipeline_per_worker(cfg, records, args.pipeline_images)})  # fmt: skip
        if args.prepared:
            from ptxseg.data.prepare import prepare

            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                prepared = prepare(args.data, Path(tmp) / "prepared", cfg.data.size,
                                   args.layout, progress=False)  # fmt: skip
                prep_s = time.perf_counter() - t0
                emit({"figure": "pipeline_per_worker", **common,
                      "source": f"ptxseg prepare copy at {cfg.data.size}",
                      "prepare_s": prep_s, "prepare_images": len(prepared),
                      **pipeline_per_worker(cfg, prepared, args.pipeline_images)})  # fmt: skip
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
