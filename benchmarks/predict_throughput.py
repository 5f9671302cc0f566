"""Throughput of ``ptxseg predict`` against a bare forward pass of the same model.

For each encoder and backend, in one run:

- ``bare``: the model alone on a uint8 batch already in memory (on the device for torch):
  forward + sigmoid (+ the mirrored pass with ``--tta hflip``), synchronised, after warm-up;
- ``predict``: the library function :func:`ptxseg.predict.predict` on a folder of real
  1024x1024 SIIM PNGs (the shared sample, hard-linked or copied until there are ``--n`` files):
  decode in DataLoader workers, resize, model, resize back, binarize, write mask + overlay PNGs
  and results.csv; images/s of its loop (model loading excluded);
- the ratios predict / bare (per backend) and ONNX Runtime / torch eager (bare and predict).

The network is randomly initialised (``encoder_weights: null``; speed does not depend on the
weights) with its segmentation head scaled so that masks cover a sizeable, structured part of
each image: post-processing, outlines and PNG sizes are then no cheaper than for a trained model.

Prints one JSON line per figure on stdout and a Markdown table on stderr. Usage::

    python benchmarks/predict_throughput.py --encoders efficientnet-b0,efficientnet-b4 \\
        --size 512 [--n 32] [--backends torch,onnx] [--tta none,hflip] [--batch-size 4] \\
        [--workers N] [--no-overlays] [--device auto] [--compile] [--repeats 2]

Each figure is the best of ``--repeats`` interleaved measurements (bare, predict, bare,
predict...), so that load from other processes on a shared machine distorts the ratio least.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO.parent / "shared" / "data" / "siim-sample" / "png_images"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import emit, link_images, make_random_run  # noqa: E402


def input_batch(files: list[Path], size: int, batch: int) -> np.ndarray:
    from ptxseg.data.resize import resize_to

    imgs = [resize_to(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), size) for p in files[:batch]]
    while len(imgs) < batch:
        imgs.append(imgs[len(imgs) % len(files)])
    return np.stack(imgs)[:, None]


def bare_rate(model, x: np.ndarray, n: int, tta: str, warmup: int) -> float:
    """One backend of the predictor alone (``TorchModel`` or ``OnnxModel``: ``probs`` of a host
    batch, probabilities back on the host, as predict runs it), images/s."""
    batches = max(1, -(-n // x.shape[0]))
    for _ in range(warmup):
        model.probs(x, tta)
    t0 = time.perf_counter()
    for _ in range(batches):
        model.probs(x, tta)
    return batches * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--encoders", default="efficientnet-b0,efficientnet-b4")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=None,
                    help="images in the predict folder (default: 2048 GPU, 32 CPU)")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--tta", default="none", help="comma list: none,hflip")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 GPU, 4 CPU")
    ap.add_argument("--workers", type=int, default=None, help="default: predict's own")
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile (CUDA)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs; best is kept")
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    args = ap.parse_args()

    from rich.console import Console

    from ptxseg.export import export_run
    from ptxseg.hardware import inference_batch_size, resolve_device
    from ptxseg.onnx_runtime import OnnxModel, onnx_providers
    from ptxseg.predict import predict
    from ptxseg.predictor import TorchModel
    from ptxseg.run import Run

    device = torch.device(resolve_device(args.device))
    batch = inference_batch_size(args.batch_size, device.type)
    args.n = args.n or (2048 if device.type == "cuda" else 32)
    warmup = 3 if args.compile else 1
    machine = {
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    emit({"figure": "machine", **machine})
    work = args.keep or Path(tempfile.mkdtemp(prefix="ptxseg-bench-"))
    quiet = Console(stderr=True, quiet=True)
    table = []
    try:
        files = link_images(args.sample, args.n, work / "images")
        for encoder in args.encoders.split(","):
            run = work / f"run-{encoder}-{args.size}"
            model = make_random_run(run, size=args.size, encoder=encoder)
            x = input_batch(files, args.size, batch)
            common = {"encoder": encoder, "size": args.size, "batch": batch,
                      "images": args.n, "device": machine["device"]}
            for tta in args.tta.split(","):
                rates: dict[tuple[str, str], float] = {}
                for backend in args.backends.split(","):
                    if backend == "torch":
                        m = TorchModel(model, device.type, compile=args.compile)
                        bare_once = partial(bare_rate, m, x, args.n, tta, warmup)
                    else:
                        if not Run(run).onnx_path.exists():
                            res = export_run(run)
                            emit({"figure": "onnx_parity", **common,
                                  "max_abs_diff": res.max_abs_diff,
                                  "export_s": round(res.seconds, 1)})
                        providers = onnx_providers(device.type == "cuda")
                        om = OnnxModel(Run(run).onnx_path, providers)
                        bare_once = partial(bare_rate, om, x, args.n, tta, warmup)
                    out = work / f"out-{encoder}-{backend}-{tta}"
                    bares, preds = [], []
                    for _ in range(args.repeats):  # interleaved: drift hits both alike
                        bares.append(bare_once())
                        summary = predict(
                            run, [work / "images"], out, tta=tta, backend=backend,
                            batch_size=batch, workers=args.workers,
                            overlays=not args.no_overlays, device=args.device,
                            compile=args.compile if backend == "torch" else None,
                            progress=False, console=quiet,
                        )
                        assert summary.n_errors == 0 and summary.n_images == args.n
                        preds.append(summary.images_per_s)
                        shutil.rmtree(out, ignore_errors=True)
                    bare, pred = max(bares), max(preds)  # best of: least disturbed
                    ratio = pred / bare
                    rates[("bare", backend)] = bare
                    rates[("predict", backend)] = pred
                    emit({"figure": "bare_forward", "backend": backend, "tta": tta, **common,
                          "images_per_s": round(bare, 3),
                          "samples": [round(v, 3) for v in bares]})
                    emit({"figure": "predict", "backend": backend, "tta": tta, **common,
                          "overlays": not args.no_overlays, "workers": args.workers,
                          "images_per_s": round(pred, 3),
                          "samples": [round(v, 3) for v in preds],
                          "predict_over_bare": round(ratio, 3)})
                    table.append((encoder, tta, backend, bare, pred, ratio))
                if ("bare", "onnx") in rates and ("bare", "torch") in rates:
                    emit({"figure": "onnx_over_torch", "tta": tta, **common,
                          "bare": round(rates[("bare", "onnx")] / rates[("bare", "torch")], 3),
                          "predict": round(rates[("predict", "onnx")]
                                           / rates[("predict", "torch")], 3)})
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    emit({"figure": "loadavg_end", "loadavg_1min": round(os.getloadavg()[0], 2)})
    print(f"\n{args.size} px, batch {batch}, {args.n} images, {machine['device']}, "
          f"{machine['cores']} cores", file=sys.stderr)
    print("| encoder | TTA | backend | bare img/s | predict img/s | predict / bare |",
          file=sys.stderr)
    print("|---|---|---|---:|---:|---:|", file=sys.stderr)
    for enc, tta, backend, bare, pred, ratio in table:
        print(f"| {enc} | {tta} | {backend} | {bare:.2f} | {pred:.2f} | {ratio:.2f} |",
              file=sys.stderr)


if __name__ == "__main__":
    main()
