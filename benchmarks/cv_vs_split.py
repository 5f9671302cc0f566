"""K-fold cross-validation against one train/validation split, on the real SIIM sample.

A quarter of the images is held out first as a common test set (stratified, seed
``--seed``); the rest is the development set. On it, through the normal command line:

- ``ptxseg train --folds K`` (each fold trains on (K-1)/K of the development set) and
  ``ptxseg tune CV`` (the rule chosen on the out-of-fold predictions);
- one run on a single split whose validation share is 1/K (``data.val_fraction``), so it trains
  on as many images as a fold, with the same seed, epochs, size and schedule, and ``ptxseg
  tune`` on its validation split.

Then ``ptxseg evaluate``: each fold on its own validation images (the CV rule), the single run
on its validation split (its own rule), and on the held-out test set: the ensemble of the folds,
each fold alone (the CV rule) and the single run (its rule). One JSON line per figure (95%
percentile-bootstrap intervals over images, and paired ones for the ensemble's differences on
the test set); the dataset subsets are manifest CSVs under ``--work`` (the images are read
where they are). Figures of a CPU run on the 108-image sample: docs/accuracy.md.

    python benchmarks/cv_vs_split.py --data ../shared/data/siim-sample --work /tmp/ptxseg-cv

``--skip-train`` re-runs tune/evaluate on existing runs; ``--report`` only prints the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import emit, image_stats, paired_difference  # noqa: E402

from ptxseg.run import Run  # noqa: E402


def settings(args: argparse.Namespace) -> list[str]:
    sets = {
        "model.encoder": args.encoder,
        "model.encoder_weights": args.weights,
        "data.size": args.size,
        "data.workers": args.workers,
        "data.positive_fraction": args.positive_fraction,
        "train.batch_size": args.batch,
        "train.epochs": args.epochs,
        "train.patience": args.epochs,  # no early stop: every run sees every epoch
        "train.seed": args.seed,
        "train.accelerator": "cpu" if args.cpu else "auto",
        "optim.lr": args.lr,
        "optim.lr_min": args.lr_min,
    }
    out: list[str] = []
    for k, v in sets.items():
        out += ["--set", f"{k}={'null' if v is None else v}"]
    for extra in args.set:
        out += ["--set", extra]
    return out


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, stdout=sys.stderr).returncode  # stdout: only the JSON lines
    if code:
        sys.exit(f"cv_vs_split.py: `{' '.join(cmd[2:4])}` failed (exit code {code})")
    return time.perf_counter() - t0


def write_subsets(data: Path, work: Path, seed: int) -> tuple[Path, Path]:
    """The development and held-out test sets as manifest CSVs (id,image,mask)."""
    from ptxseg.data.sources import load_records
    from ptxseg.data.split import make_split

    records, _ = load_records(data, "png")
    side = make_split(records, 0.25, seed)
    paths = {}
    for name, wanted in (("dev", "train"), ("test", "val")):
        path = work / name / "manifest.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "image", "mask"])
            w.writerows([r.id, r.image.resolve(), r.mask.resolve()] for r in records
                        if side[r.id] == wanted)  # fmt: skip
        paths[name] = path
    return paths["dev"], paths["test"]


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def metrics(path: Path) -> dict:
    """An evaluation's figures, with 95% percentile-bootstrap intervals over its images
    (:func:`ptxseg.metrics.bootstrap_cis`, 2000 resamples, seed 0) from its per_image.csv."""
    from ptxseg.metrics import bootstrap_cis

    m = json.loads(path.read_text())
    p, d = m["pooled"], m["detection"]
    cis = bootstrap_cis(image_stats(path.parent))["intervals"]
    return {
        "images": m["n_images"],
        "positive": m["n_positive"],
        "pooled_dice": _r(p["f1"]),
        "pooled_iou": _r(p["iou"]),
        "siim_per_image_dice": _r(m["per_image"]["kaggle_dice"]),
        "dice_positive_mean": _r(m["per_image"]["dice_positive_mean"]),
        "sensitivity": _r(d["sensitivity"]),
        "specificity": _r(d["specificity"]),
        "detection_auc": _r(d["auc"]),
        "ci95": {k.split(".")[1]: v and [round(x, 4) for x in v] for k, v in cis.items()},
        "tp": p["tp"], "fp": p["fp"], "fn": p["fn"],
        "rule": m["thresholds"],
        "members": len(m["members"]),
    }  # fmt: skip



def pooled(records: list[dict]) -> dict:
    """Pooled Dice/IoU of several evaluations' pixel counts summed (the out-of-fold figure)."""
    tp, fp, fn = (sum(r[k] for r in records) for k in ("tp", "fp", "fn"))
    return {
        "images": sum(r["images"] for r in records),
        "positive": sum(r["positive"] for r in records),
        "pooled_dice": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None,
        "pooled_iou": round(tp / (tp + fp + fn), 4) if tp + fp + fn else None,
        "tp": tp, "fp": fp, "fn": fn,
    }  # fmt: skip


def rule_of(run_dir: Path) -> dict:
    t = json.loads(Run(run_dir).thresholds_path.read_text())
    keep = ("binary_threshold", "removal_area", "objective", "score", "n_images", "n_positive")
    out = {k: t[k] for k in keep}
    if "out_of_fold" in t:
        out["folds"] = [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}
            for f in t["out_of_fold"]["folds"]
        ]
    return out


def best_epoch(run_dir: Path) -> dict:
    from ptxseg.plots import read_metrics

    rows = read_metrics(Run(run_dir).metrics_path)
    best = max(rows, key=lambda r: r["val_iou"])
    return {
        "best_epoch": int(best["epoch"]),
        "best_val_iou_p05": round(best["val_iou"], 4),
        "best_val_dice_p05": round(best["val_dice"], 4),
        "last_val_dice_p05": round(rows[-1]["val_dice"], 4),
        "train_minutes": round(sum(r["time_s"] for r in rows) / 60, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/siim-sample"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/ptxseg-cv"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--encoder", default="efficientnet-b0")
    ap.add_argument("--weights", default=None, help="encoder weights (a file); default: none")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-min", type=float, default=1e-5)
    ap.add_argument("--positive-fraction", type=float, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config override for every run (repeatable), e.g. "
                    "loss.name=tversky")  # fmt: skip
    ap.add_argument("--skip-train", action="store_true", help="tune/evaluate existing runs")
    ap.add_argument("--report", action="store_true", help="only print the figures")
    args = ap.parse_args()
    work, k = args.work, args.folds
    ptxseg = [sys.executable, "-m", "ptxseg"]
    dev, test = write_subsets(args.data, work, args.seed)
    cv, single = work / "cv", work / "single"
    folds = [cv / f"fold-{i}" for i in range(k)]
    if not args.report:
        if not args.skip_train:
            run([*ptxseg, "train", "--data", str(dev), "--out", str(cv), "--folds", str(k),
                 *settings(args)])  # fmt: skip
            run([*ptxseg, "train", "--data", str(dev), "--out", str(single), *settings(args),
                 "--set", f"data.val_fraction={1 / k:.6f}"])  # fmt: skip
        run([*ptxseg, "tune", str(cv)])
        run([*ptxseg, "tune", str(single)])
        rule = str(Run(cv).thresholds_path)
        for fold in folds:
            run([*ptxseg, "evaluate", str(fold), "--data", str(dev), "--split", "val",
                 "--thresholds", rule, "--out", str(fold / "eval-val")])  # fmt: skip
            run([*ptxseg, "evaluate", str(fold), "--data", str(test), "--thresholds", rule,
                 "--out", str(fold / "eval-test")])  # fmt: skip
        run([*ptxseg, "evaluate", str(single), "--data", str(dev), "--split", "val",
             "--out", str(single / "eval-val")])  # fmt: skip
        run([*ptxseg, "evaluate", str(single), "--data", str(test), "--out",
             str(single / "eval-test")])  # fmt: skip
        run([*ptxseg, "evaluate", str(cv), "--data", str(test), "--out", str(cv / "eval-test")])
    fold_val = [metrics(f / "eval-val" / "metrics.json") for f in folds]
    for i, (fold, m) in enumerate(zip(folds, fold_val, strict=True)):
        emit({"what": f"fold {i}: its validation images, CV rule", **m, **best_epoch(fold)})
    emit({"what": "out of fold: the folds' validation images pooled, CV rule",
          **pooled(fold_val)})  # fmt: skip
    emit({"what": "CV rule (tune CV)", **rule_of(cv)})
    emit({"what": "single split: its validation images, its rule",
          **metrics(single / "eval-val" / "metrics.json"), **best_epoch(single)})  # fmt: skip
    emit({"what": "single split rule (tune)", **rule_of(single)})
    emit({"what": "test: ensemble of the folds, CV rule",
          **metrics(cv / "eval-test" / "metrics.json")})  # fmt: skip
    for i, fold in enumerate(folds):
        emit({"what": f"test: fold {i} alone, CV rule",
              **metrics(fold / "eval-test" / "metrics.json")})  # fmt: skip
    emit({"what": "test: single split run, its rule",
          **metrics(single / "eval-test" / "metrics.json")})  # fmt: skip
    ens = cv / "eval-test"
    emit({"what": "test, paired bootstrap 95% interval: ensemble minus single run",
          **paired_difference(ens, single / "eval-test")})  # fmt: skip
    for i, fold in enumerate(folds):
        emit({"what": f"test, paired bootstrap 95% interval: ensemble minus fold {i}",
              **paired_difference(ens, fold / "eval-test")})  # fmt: skip


if __name__ == "__main__":
    main()
