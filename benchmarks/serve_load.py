"""``ptxseg serve`` under load against ``ptxseg predict`` on the same images, in one run.

1. Builds a run folder by hand (:func:`_runs.make_random_run`: U-Net + ``--encoder``, random
   weights with the segmentation head scaled so masks cover a structured part of each image,
   ``--size`` px input, thresholds.json: probs > 0.5), and a folder of ``--n`` files (hard
   links) cycling over the real 1024x1024 SIIM PNGs of the shared sample.
2. Starts the real command ``python -m ptxseg serve RUN --port 0 --max-batch B`` as a child
   process on 127.0.0.1, sends one warm-up request (not counted), then the ``--n`` images, one
   request each (raw PNG body), ``--concurrency`` at a time from as many client threads. Per
   request: latency (send to full answer read); overall: p50/p99 latency, images/s (requests
   answered / first send to last answer), answers by status (503 = refused by the full
   queue), and the server's resident set size (VmRSS of its process, /proc) sampled every
   ``--rss-every`` s: at the start of the load, its peak, at the end, and the peak of each half
   of the run (flat memory: the second half no higher than the first).
3. Runs ``python -m ptxseg predict RUN FOLDER --out OUT --batch-size B`` (same device, same
   batch size, the default reading workers and writing threads, overlays on) on the same
   files and reads its images/s from ``predict.json``: the prediction loop, model loading
   excluded, as the serve figure excludes it (the server is up and warm before the clock
   starts); its whole wall time, process start and model loading included, is printed too.
4. The ratio serve / predict of images/s.

Both produce the same work per image: decode the PNG, the model on the batch, probabilities
back to 1024x1024, the thresholded mask, a mask PNG and an overlay PNG (serve: also the
256 px probability map and 512 px preview of the viewer, base64 in the JSON answer; predict:
files written atomically and results.csv). ``--lean`` compares ``images=false`` (JSON with the
run-length mask only) with ``predict --no-overlays`` instead.

Needs the serve extra and httpx (both in the dev extra). Prints one JSON line per figure on
stdout and a Markdown table on stderr. Usage::

    python benchmarks/serve_load.py [--n 200] [--concurrency 8] [--encoder efficientnet-b0] \\
        [--size 256] [--batch-size 4] [--device auto] [--lean] [--sample DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO.parent / "shared" / "data" / "siim-sample" / "png_images"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import emit, link_images, make_random_run  # noqa: E402


def child_env() -> dict[str, str]:
    """This checkout's code first on the child's path, offline."""
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p)}  # fmt: skip



def rss_mb(pid: int) -> float | None:
    """The resident set size of a process (VmRSS), MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """(seconds since start, RSS MB) of ``pid`` every ``every`` s until :meth:`stop`."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while True:
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((time.perf_counter() - self.t0, value))
            if self._done.wait(self.every):
                return

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        value = rss_mb(self.pid)  # the end, after the last answer
        if value is not None:
            self.samples.append((time.perf_counter() - self.t0, value))
        return self.samples


def start_server(run: Path, args, batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ptxseg", "serve", str(run), "--host", "127.0.0.1",
           "--port", "0", "--device", args.device, "--max-batch", str(batch)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"on (http://\S+?)/ ", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"ptxseg serve did not start: {line!r}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C: uvicorn's graceful stop
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-100) by linear interpolation between order statistics."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def load(base: str, files: list[Path], args) -> dict:
    import httpx

    params = {"images": "false" if args.lean else "true"}
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)  # fmt: skip
    with httpx.Client(base_url=base, timeout=600, limits=limits) as http:
        warm = http.post("/v1/predict", content=files[0].read_bytes(), params=params)
        assert warm.status_code == 200, warm.text
        model = http.get("/v1/model").json()

        def one(path: Path) -> tuple[int, float, str]:
            body = path.read_bytes()
            t0 = time.perf_counter()
            r = http.post("/v1/predict", content=body, params=params)
            seconds = time.perf_counter() - t0
            rle = r.json().get("rle", "") if r.status_code == 200 else ""
            return r.status_code, seconds, rle

        pid = args.server_pid
        sampler = RssSampler(pid, args.rss_every)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(one, files))
        wall = time.perf_counter() - t0
        samples = sampler.stop()
        health = http.get("/healthz").json()
    ok = [s for code, s, _ in answers if code == 200]
    statuses: dict[str, int] = {}
    for code, _, _ in answers:
        statuses[str(code)] = statuses.get(str(code), 0) + 1
    rss = [v for _, v in samples]
    half = wall / 2
    first = [v for t, v in samples if t <= half] or rss[:1]
    second = [v for t, v in samples if t > half] or rss[-1:]
    return {
        "requests": len(files),
        "concurrency": args.concurrency,
        "ok": len(ok),
        "statuses": statuses,
        "refused_503": statuses.get("503", 0),
        "errors": len(files) - len(ok) - statuses.get("503", 0),  # other than 503
        "wall_s": round(wall, 2),
        "images_per_s": round(len(ok) / wall, 3),
        "latency_p50_s": round(percentile(ok, 50), 3) if ok else None,
        "latency_p99_s": round(percentile(ok, 99), 3) if ok else None,
        "latency_max_s": round(max(ok), 3) if ok else None,
        "rss_start_mb": round(rss[0], 1),
        "rss_peak_mb": round(max(rss), 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_peak_first_half_mb": round(max(first), 1),
        "rss_peak_second_half_mb": round(max(second), 1),
        "rss_samples": len(rss),
        "batches": health.get("batches"),
        "tta": model.get("tta"),
        "positive": sum(1 for code, _, rle in answers if code == 200 and rle != "-1"),
    }


def run_predict(run: Path, folder: Path, out: Path, args, batch: int) -> dict:
    cmd = [sys.executable, "-m", "ptxseg", "predict", str(run), str(folder), "--out", str(out),
           "--device", args.device, "--batch-size", str(batch)]  # fmt: skip
    if args.lean:
        cmd.append("--no-overlays")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"ptxseg predict failed ({done.returncode}): {done.stderr[-2000:]}")
    record = json.loads((out / "predict.json").read_text())
    assert record["images"] == args.n and record["errors"] == 0, record
    return {
        "images": record["images"],
        "positive": record["positive"],
        "images_per_s": record["images_per_s"],
        "command_wall_s": round(wall, 2),
        "overlays": record.get("overlays"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="requests (and images for predict)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--encoder", default="efficientnet-b0")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="serve --max-batch and predict --batch-size (default: 32 GPU, 4 CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--lean", action="store_true",
                    help="images=false against predict --no-overlays")
    ap.add_argument("--rss-every", type=float, default=0.5, help="RSS sampling period, s")
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    args = ap.parse_args()

    import torch

    from ptxseg.hardware import inference_batch_size, resolve_device

    device = resolve_device(args.device)
    args.device = device
    batch = inference_batch_size(args.batch_size, torch.device(device).type)
    emit({"figure": "machine", "machine": platform.machine(),
          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
          "torch": torch.__version__, "loadavg_1min": round(os.getloadavg()[0], 2)})  # fmt: skip
    work = args.keep or Path(tempfile.mkdtemp(prefix="ptxseg-serve-bench-"))
    common = {"encoder": args.encoder, "size": args.size, "batch": batch, "device": device,
              "images": args.n, "lean": args.lean}  # fmt: skip
    try:
        run = work / "run"
        make_random_run(run, size=args.size, encoder=args.encoder)
        files = link_images(args.sample, args.n, work / "images")
        proc, base = start_server(run, args, batch)
        try:
            args.server_pid = proc.pid
            served = load(base, files, args)
        finally:
            code = stop_server(proc)
        emit({"figure": "serve", **common, **served, "server_exit": code})
        predicted = run_predict(run, work / "images", work / "out", args, batch)
        emit({"figure": "predict", **common, **predicted})
        ratio = served["images_per_s"] / predicted["images_per_s"]
        emit({"figure": "serve_over_predict", **common, "images_per_s": round(ratio, 3)})
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    emit({"figure": "loadavg_end", "loadavg_1min": round(os.getloadavg()[0], 2)})
    s, p = served, predicted
    print(f"\n{args.encoder} {args.size} px, batch {batch}, {args.n} images, {device}, "
          f"{os.cpu_count()} cores", file=sys.stderr)
    print("| | images/s | p50 latency | p99 latency | 503 / errors | server RSS start / peak / "
          "end |", file=sys.stderr)
    print("|---|---:|---:|---:|---:|---|", file=sys.stderr)
    print(f"| serve, {args.concurrency} at a time | {s['images_per_s']:.2f} | "
          f"{s['latency_p50_s']:.2f} s | {s['latency_p99_s']:.2f} s | {s['refused_503']} / "
          f"{s['errors']} | {s['rss_start_mb']:.0f} / {s['rss_peak_mb']:.0f} / "
          f"{s['rss_end_mb']:.0f} MB |", file=sys.stderr)
    print(f"| predict | {p['images_per_s']:.2f} | | | 0 / 0 | |", file=sys.stderr)
    print(f"| serve / predict | **{ratio:.2f}** | | | | |", file=sys.stderr)


if __name__ == "__main__":
    main()
