"""What the DataLoader workers' start method costs (``fork``, ``forkserver``, ``spawn``), each in
a fresh process, with the training loader ptxseg builds (``ptxseg.train.make_loader``'s
dataset, augmentations, ``worker_init`` and persistent workers; ``ptxseg.hardware``
chooses ``forkserver`` on CUDA, ``fork`` elsewhere).

Per method, one JSON line:

- ``first_batch_s``: from ``iter(loader)`` to the first batch (workers started, then their
  first items decoded, resized and augmented): the start cost the user waits for;
- ``epoch1_s`` / ``epoch2_s``: the whole first and second epoch (persistent workers: the
  second reuses them, so ``epoch1_s - epoch2_s`` is about the start cost);
- ``epoch2_first_batch_s``: the second epoch's first batch (no restart);
- ``fork_warnings``: how often the child printed Python's "This process is multi-threaded,
  use of fork() may lead to deadlocks in the child" (with ``--device cuda`` the child first
  makes a CUDA context, as training does before its loaders iterate).

Usage::

    python benchmarks/worker_start.py --data ../shared/data/siim-sample --workers 2 --size 64
    python benchmarks/worker_start.py --data .gpu-data/siim-sample --workers 15 --size 512 \\
        --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import run_killable  # noqa: E402

METHODS = ("fork", "forkserver", "spawn")
FORK_WARNING = "use of fork() may lead to deadlocks"


def child(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.utils.data import DataLoader

    from ptxseg import hardware
    from ptxseg.augment import train_augmenter
    from ptxseg.config import load_config
    from ptxseg.data.dataset import SegDataset, worker_init
    from ptxseg.data.sources import load_records

    if args.device == "cuda":  # a CUDA context and its threads, as in training
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    cfg = load_config("paper", [f"data.size={args.size}", f"train.batch_size={args.batch}"])
    records, _ = load_records(args.data, "auto")
    dataset = SegDataset(records, args.size, train_augmenter(cfg.augment, 0))
    loader = DataLoader(
        dataset, batch_size=args.batch, shuffle=True, drop_last=len(dataset) > args.batch,
        worker_init_fn=worker_init,
        **hardware.loader_kwargs(args.device, args.workers, persistent=True,
                                 start_method=args.method),
    )  # fmt: skip
    imported = time.perf_counter() - T_START

    def epoch() -> tuple[float, float]:
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        for _ in it:
            pass
        return first, time.perf_counter() - t0

    first1, epoch1 = epoch()
    first2, epoch2 = epoch()
    return {
        "figure": "worker_start", "method": args.method, "device": args.device,
        "workers": args.workers, "batch": args.batch, "size": args.size,
        "images": len(dataset), "import_and_build_s": round(imported, 2),
        "first_batch_s": round(first1, 3), "epoch1_s": round(epoch1, 3),
        "epoch2_first_batch_s": round(first2, 3), "epoch2_s": round(epoch2, 3),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--timeout", type=float, default=300, help="seconds per method")
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(child(args)), flush=True)
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH"))
                                        if p)  # fmt: skip
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method, "--data", str(args.data),
               "--workers", str(args.workers), "--size", str(args.size),
               "--batch", str(args.batch), "--device", args.device]  # fmt: skip
        t0 = time.perf_counter()
        done = run_killable(cmd, env, args.timeout)
        if done is None:
            print(json.dumps({"figure": "timeout", "method": method}), flush=True)
            continue
        code, out, err = done
        if code != 0:
            print(json.dumps({"figure": "error", "method": method,
                              "stderr": err.strip().splitlines()[-5:]}), flush=True)  # fmt: skip
            continue
        record = json.loads(out.strip().splitlines()[-1])
        record["fork_warnings"] = err.count(FORK_WARNING)
        record["process_wall_s"] = round(time.perf_counter() - t0, 2)
        record["load_avg"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
