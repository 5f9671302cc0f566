"""Helpers shared by the benchmark scripts: JSON output and a run folder built by hand."""

from __future__ import annotations

import json
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
