"""Peak memory of ``ptxseg predict`` against the number of images: it must not grow.

For each folder size (default 200 and 2,000 synthetic radiographs), runs the real command line
(``python -m ptxseg predict RUN FOLDER --out OUT``) in a subprocess and measures:

- ``peak_rss_mb``: the largest resident set of any single process of the command (its
  ``ru_maxrss`` from ``wait4``, the kernel's high-water mark: nothing is missed between samples);
- ``peak_tree_pss_mb``: the largest sum of the proportional set sizes (PSS: shared pages split
  between the processes that share them) of the command and its DataLoader workers, sampled
  every 50 ms from /proc (Linux): what the machine had to hold at once;
- images/s and the wall time.

The run folder is built by hand: U-Net + EfficientNet-B0, random weights (``encoder_weights:
null``) whose segmentation head is scaled so that masks cover a structured part of each image
(outlines and overlays cost what they cost for a trained model); thresholds.json with a
component-removal area. Images are synthetic chest radiographs (``ptxseg.data.synthetic``).

Prints one JSON line per folder size and a Markdown table on stderr. Usage::

    python benchmarks/predict_memory.py [--counts 200,2000] [--image-size 128] \\
        [--model-size 64] [--workers N] [--batch-size 4] [--no-overlays]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import emit, make_random_run  # noqa: E402


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    stat = fh.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _pss_kb(pid: int) -> int:
    """Proportional set size (shared pages split between the processes that map them, so the
    sum over the forked DataLoader workers does not count torch's libraries N times); VmRSS
    where smaps_rollup is missing."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            with open(f"/proc/{pid}/{name}", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(key):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0


def run_predict(run: Path, folder: Path, out: Path, args) -> dict:
    cmd = [
        sys.executable, "-m", "ptxseg", "predict", str(run), str(folder), "--out", str(out),
        "--device", "cpu", "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.no_overlays:
        cmd.append("--no-overlays")
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as fh:  # benchmark scratch file, not a project output
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    peak_tree = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not stop.is_set():
            peak_tree = max(peak_tree, sum(_pss_kb(p) for p in _tree(proc.pid)))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this command's own high-water mark
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"predict failed ({proc.returncode}):\n{log.read_text()[-2000:]}")
    info = json.loads((out / "predict.json").read_text())
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_tree_pss_mb": round(peak_tree / 1024, 1),
        "images_per_s": info["images_per_s"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="200,2000")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--model-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="default: the command's own")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-overlays", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    from ptxseg.data.synthetic import generate

    rows = []
    with tempfile.TemporaryDirectory(prefix="ptxseg-predmem-") as tmp:
        tmp = Path(tmp)
        make_random_run(
            tmp / "run", size=args.model_size, removal_area=20, extra=("train.accelerator=cpu",)
        )
        generate(tmp / "data", n=max(counts), size=args.image_size, seed=0)
        images = sorted((tmp / "data" / "png_images").glob("*.png"))
        for n in counts:
            folder = tmp / f"in{n}"
            folder.mkdir()
            for p in images[:n]:
                os.link(p, folder / p.name)
            result = run_predict(tmp / "run", folder, tmp / f"out{n}", args)
            record = {
                "benchmark": "predict_memory",
                "images": n,
                "image_size": args.image_size,
                "model_size": args.model_size,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "overlays": not args.no_overlays,
                **result,
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
            }
            emit(record)
            rows.append(record)
    print("| images | peak RSS, largest process (MB) | peak PSS, all processes (MB) | "
          "images/s | wall (s) |", file=sys.stderr)  # fmt: skip
    print("| --- | --- | --- | --- | --- |", file=sys.stderr)
    for r in rows:
        print(f"| {r['images']:,} | {r['peak_rss_mb']} | {r['peak_tree_pss_mb']} | "
              f"{r['images_per_s']:.1f} | {r['wall_s']} |", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
