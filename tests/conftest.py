"""Shared fixtures. Tests are CPU-only, small and synthetic; the real SIIM sample is read from
``../shared/data/siim-sample`` (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # smp otherwise retries the hub for ~25 s
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "siim-sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real SIIM-ACR sample. Skips where it is absent; fails in CI
    (``PTXSEG_REQUIRE_SAMPLE=1``)."""
    if not (SAMPLE / "png_images").is_dir():
        msg = f"real SIIM sample not found at {SAMPLE}"
        if os.environ.get("PTXSEG_REQUIRE_SAMPLE") == "1":
            pytest.fail(msg + " (PTXSEG_REQUIRE_SAMPLE=1)")
        pytest.skip(msg)
    return SAMPLE


def tiny_config(**overrides):
    """A CPU-sized config: small encoder, 64 px, no pretrained weights, no workers."""
    from ptxseg.config import load_config

    sets = {
        "model.encoder": "efficientnet-b0",
        "model.encoder_weights": None,
        "data.size": 64,
        "data.workers": 0,
        "train.batch_size": 4,
        "train.epochs": 2,
        "train.patience": 5,
        "train.accelerator": "cpu",
        "train.compile": False,
    }
    sets.update(overrides)
    return load_config("paper", [f"{k}={'null' if v is None else v}" for k, v in sets.items()])


@pytest.fixture
def tiny_cfg():
    return tiny_config()
