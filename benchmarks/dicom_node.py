"""``ptxseg dicom-node`` under a burst against ``ptxseg predict`` on the same DICOMs, in one run.

1. Builds a run folder by hand (:func:`_runs.make_random_run`: U-Net + ``--encoder``, random
   weights with the head scaled so masks are structured, ``--size`` px, probs > 0.5), and
   ``--n`` DICOM files: the 12 real SIIM-ACR DICOMs of the shared sample cycled, each copy
   with a new SOP Instance UID (the node answers an instance once).
2. Starts a real Orthanc (Debian's) on free 127.0.0.1 ports as the destination, and the real
   command ``python -m ptxseg dicom-node RUN --port 0 --send-to ORTHANC@... --max-batch B`` as
   a child process; one warm-up image is sent and answered (not counted).
3. dcmtk's ``storescu`` sends the ``--n`` files at once (one association, one C-STORE after
   the other, as a modality or a PACS pushes a batch). Per image, from the node's spool
   records (``done/*.json``): latency = received (the instance written to the spool, before
   its success status) -> its last result stored by Orthanc (its C-STORE success); images/s
   = n / (first received -> last stored). Orthanc's instance count is checked: 2 per image.
4. Runs ``python -m ptxseg predict RUN FOLDER --out OUT --batch-size B --dicom-seg`` (same
   device and batch size, default reading workers and writing threads, overlays on) on the
   same files; images/s from its ``predict.json`` (the prediction loop, model loading
   excluded, as the node's clock starts with the model loaded and warm).
5. The ratio node / predict of images/s.

Work per image: the node decodes the DICOM (when it arrives, and the worker reuses it),
writes it to the spool with fsync, runs the model, resizes back, builds and writes a SEG and an
SR, and sends both over DICOM; predict decodes, runs the model, resizes back, writes a mask
PNG, an overlay PNG and a SEG, and a results.csv row.

Needs Orthanc and dcmtk (Debian: ``apt-get install orthanc dcmtk``) and the dicom-node extra.
Prints one JSON line per figure on stdout and a Markdown table on stderr. Usage::

    python benchmarks/dicom_node.py [--n 50] [--encoder efficientnet-b0] [--size 256] \\
        [--batch-size 4] [--device cpu] [--sample DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO.parent / "shared" / "data" / "siim-sample" / "dicom"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import emit, make_random_run  # noqa: E402


def child_env() -> dict[str, str]:
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copies(sample: Path, n: int, dest: Path) -> list[Path]:
    """``n`` DICOMs cycling over the sample's, each with a new SOP Instance UID."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted(sample.glob("*.dcm"))
    if not sources:
        raise SystemExit(f"{sample}: no DICOM files")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = dest / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def start_orthanc(root: Path) -> tuple[subprocess.Popen, str, int]:
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    http, dicom = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": http, "DicomPort": dicom,
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "HttpThreadsCount": 8}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{http}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/system", timeout=5).read()
            return proc, url, dicom
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("Orthanc did not start")


def orthanc_count(url: str) -> int:
    return len(json.loads(urllib.request.urlopen(url + "/instances", timeout=30).read()))


def start_node(args: list[str]) -> tuple[subprocess.Popen, int, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "ptxseg", "dicom-node", *args, "--port", "0"],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    started = threading.Event()
    port: list[int] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            found = re.search(r"dicom-node \S+ on 127\.0\.0\.1:(\d+)", line)
            if found:
                port.append(int(found.group(1)))
                started.set()
        started.set()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(300) or not port:
        proc.kill()
        raise SystemExit("dicom-node did not start:\n" + "\n".join(lines[-20:]))
    return proc, port[0], lines


def wait_done(spool: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list((spool / "done").glob("*.json"))) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{spool}: not {n} images answered in {timeout:.0f} s")
        time.sleep(0.05)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--encoder", default="efficientnet-b0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    args = parser.parse_args()

    storescu = shutil.which("storescu")
    if storescu is None:
        raise SystemExit("storescu not found (apt-get install dcmtk)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="ptxseg-node-bench-"))
    run = work / "run"
    make_random_run(run, size=args.size, encoder=args.encoder)
    files = copies(args.sample, args.n, work / "images")
    warm = copies(args.sample, 1, work / "warm")
    orthanc, url, dicom_port = start_orthanc(work / "orthanc")
    spool = work / "spool"
    node = None
    try:
        node, port, lines = start_node(
            [str(run), "--spool", str(spool), "--send-to", f"ORTHANC@127.0.0.1:{dicom_port}",
             "--max-batch", str(args.batch_size), "--device", args.device])  # fmt: skip
        subprocess.run([storescu, "-xy", "-aec", "PTXSEG", "127.0.0.1", str(port), *map(str, warm)],
                       check=True, capture_output=True)  # fmt: skip
        wait_done(spool, 1, 120)
        for record in (spool / "done").glob("*.json"):
            record.rename(work / "warm" / record.name)
        t0 = time.time()
        subprocess.run([storescu, "-xy", "-aec", "PTXSEG", "127.0.0.1", str(port),
                        *map(str, files)], check=True, capture_output=True)  # fmt: skip
        t_sent = time.time() - t0
        wait_done(spool, args.n, 600)
        records = [json.loads(p.read_text()) for p in (spool / "done").glob("*.json")]
        stored = orthanc_count(url)
    finally:
        if node is not None:
            node.terminate()
            node.wait(60)
        orthanc.terminate()
        orthanc.wait(60)
    latencies = [r["latency_s"] for r in records]
    first = min(r["received_at"] for r in records)
    last = max(r["sent_at"] for r in records)
    batches = {}
    for r in records:
        batches[r["batch"]] = batches.get(r["batch"], 0) + 1
    node_ips = args.n / (last - first)
    common = {"n": args.n, "encoder": args.encoder, "size": args.size,
              "batch_size": args.batch_size, "device": args.device,
              "cpu": cpu_model(), "cores": os.cpu_count()}  # fmt: skip
    emit({"what": "dicom-node", **common, "images_per_s": round(node_ips, 3),
          "p50_latency_s": round(percentile(latencies, 50), 3),
          "p99_latency_s": round(percentile(latencies, 99), 3),
          "max_latency_s": round(max(latencies), 3), "storescu_s": round(t_sent, 3),
          "orthanc_instances": stored, "expected_instances": 2 * args.n + 2,
          "images_by_batch_size": batches})  # fmt: skip

    out = work / "predict"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ptxseg", "predict", str(run), str(work / "images"),
                    "--out", str(out), "--batch-size", str(args.batch_size), "--device",
                    args.device, "--dicom-seg"], check=True, env=child_env(),
                   capture_output=True)  # fmt: skip
    wall = time.perf_counter() - t0
    record = json.loads((out / "predict.json").read_text())
    predict_ips = float(record["images_per_s"])
    emit({"what": "predict", **common, "images_per_s": predict_ips, "wall_s": round(wall, 2)})
    emit({"what": "ratio", "node_over_predict": round(node_ips / predict_ips, 3)})
    print(
        f"\n| {args.n} DICOMs at once | images/s | p50 latency | p99 latency |\n"
        "| --- | ---: | ---: | ---: |\n"
        f"| `ptxseg dicom-node` | {node_ips:.2f} | {percentile(latencies, 50):.2f} s | "
        f"{percentile(latencies, 99):.2f} s |\n"
        f"| `ptxseg predict --dicom-seg` | {predict_ips:.2f} | | |\n"
        f"| node / predict | **{node_ips / predict_ips:.2f}x** | | |\n",
        file=sys.stderr,
    )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
