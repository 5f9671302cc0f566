"""Helpers shared by the benchmark scripts: JSON output, a run folder built by hand, input
folders of hard links, children killed past a timeout, paired bootstrap of two evaluations."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def emit(record: dict) -> None:
    """One JSON line per figure."""
    print(json.dumps(record), flush=True)


def make_random_run(
    run: Path, *, size: int, encoder: str = "efficientnet-b0", removal_area: int = 0,
    extra: tuple[str, ...] = (),
):
    """A run folder without training: config.yaml, best.ckpt (a random network whose head is
    scaled so masks are structured, not noise) and thresholds.json (probs > 0.5, the given
    removal area). Returns the model (CPU, eval)."""
    import torch

    from ptxseg.checkpoint import save_model_checkpoint
    from ptxseg.config import load_config, save_config
    from ptxseg.model import build_model
    from ptxseg.postprocess import PostParams, save_params
    from ptxseg.run import Run

    cfg = load_config(
        "paper",
        [f"model.encoder={encoder}", "model.encoder_weights=null", f"data.size={size}", *extra],
    )
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, Run(run).config_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    head = model.net.segmentation_head[0]
    with torch.no_grad():
        head.weight.mul_(150.0)
        head.bias.mul_(150.0).sub_(13.0)
    save_model_checkpoint(model, Run(run).checkpoint(), cfg)
    save_params(
        PostParams(binary_threshold=0.5, removal_area=removal_area, size=size),
        Run(run).thresholds_path,
    )
    return model


def link_images(sample: Path, n: int, dest: Path) -> list[Path]:
    """``n`` files in ``dest`` cycling over the sample's PNGs: hard links (copies across file
    systems). Not symbolic links: ``ptxseg predict`` reads a file reached twice once."""
    sources = sorted(sample.glob("*.png"))
    if not sources:
        sys.exit(f"{sample}: no PNG files (pass --sample)")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = sources[i % len(sources)].resolve()
        path = dest / f"{i:05d}_{src.name}"
        try:
            os.link(src, path)
        except OSError:
            shutil.copyfile(src, path)
        out.append(path)
    return out


def run_killable(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, str] | None:
    """Run ``cmd`` in its own process group; ``(returncode, stdout, stderr)``, or ``None`` when
    it ran past ``timeout`` seconds (then the whole group, e.g. the inductor's compile workers,
    is killed)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return proc.returncode, out, err


def image_stats(out: Path) -> list:
    """The per-image pixel counts of an evaluation (its ``per_image.csv``)."""
    from ptxseg.metrics import ImageStats

    with open(out / "per_image.csv", newline="") as fh:
        return [ImageStats(r["id"], int(r["tp"]), int(r["fp"]), int(r["fn"]), 0,
                           float(r["max_prob"])) for r in csv.DictReader(fh)]  # fmt: skip


def paired_difference(a: Path, b: Path, n: int = 2000, seed: int = 0) -> dict:
    """95% percentile-bootstrap intervals of evaluation ``a`` minus evaluation ``b`` on the same
    images, each resample drawing the same images for both: pooled Dice and SIIM per-image
    Dice."""
    import numpy as np

    from ptxseg.metrics import dice_scores

    sa, sb = image_stats(a), image_stats(b)
    if [s.id for s in sa] != [s.id for s in sb]:
        sys.exit(f"{a} and {b} evaluated other images")
    arr = {k: np.array([[getattr(s, k) for s in st] for st in (sa, sb)], float)
           for k in ("tp", "fp", "fn")}  # fmt: skip
    dice = dice_scores(arr["tp"], arr["fp"], arr["fn"])
    idx = np.random.default_rng(seed).integers(0, len(sa), size=(n, len(sa)))
    tp, fp, fn = (arr[k][:, idx].sum(axis=2) for k in ("tp", "fp", "fn"))
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = 2 * tp / (2 * tp + fp + fn)
    per_image = dice[:, idx].mean(axis=2)
    out = {}
    for name, v in (("pooled_dice", pooled), ("siim_per_image_dice", per_image)):
        diff = v[0] - v[1]
        diff = diff[np.isfinite(diff)]
        out[name] = [round(float(x), 4) for x in np.quantile(diff, [0.025, 0.975])]
    return out
