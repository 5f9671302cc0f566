"""Shared fixtures. Tests are CPU-only, small and synthetic; the real SIIM sample is read from
``../shared/data/siim-sample`` (never copied into the repo)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # smp otherwise retries the hub for ~25 s
os.environ.setdefault("MPLBACKEND", "Agg")
# a wide console for rich, so long temporary paths are not folded in captured output
os.environ["COLUMNS"] = "240"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "siim-sample"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python process: this checkout's ``src/`` first on its path
    (so it runs this code, whatever package is installed) and the repository root (for
    ``tests.*``), offline."""
    paths = [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}  # fmt: skip


def run_bounded(cmd: list[str], timeout: float, what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, output captured as text; past ``timeout`` the whole
    group (DataLoader workers included) is killed and the test fails, never hangs."""
    kwargs.setdefault("env", subprocess_env())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} still running after {timeout:.0f} s (killed)")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def sigkill(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a child (a crash no handler sees) and check that it died of it."""
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=timeout) == -signal.SIGKILL


def reap(proc: subprocess.Popen) -> None:
    """Kill and wait for a child that is still running (a test's ``finally``)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


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


# --- data layer (data engineer) -----------------------------------------------------------


def write_dicom(path, pixels=None, **attrs):
    """Write a small uncompressed DICOM file; ``pixels=None`` writes one without pixel data.

    ``pixels`` is a uint8/uint16/int16 (H, W) array; ``attrs`` set/override header fields
    (e.g. ``PhotometricInterpretation="MONOCHROME1"``, ``WindowCenter=..``).
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = attrs.get("SOPInstanceUID") or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P0"
    ds.Modality = "CR"
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def make_dicom():
    """``make_dicom(path, pixels, **attrs)``: see :func:`write_dicom`."""
    return write_dicom


# --- prediction and export (prediction engineer) ------------------------------------------


def make_run(run, *, encoder="efficientnet-b0", decisive=True, thresholds=None, seed=0):
    """A run folder built by hand: ``config.yaml`` (tiny config), ``best.ckpt`` and, when
    ``thresholds`` (a PostParams) is given, ``thresholds.json``. ``decisive`` scales the
    segmentation head of the random network so its logits spread over about +-10: masks are
    then far from the 0.5 threshold almost everywhere (torch vs ONNX comparisons stay exact).
    Returns the model (CPU, eval)."""
    import torch

    from ptxseg.checkpoint import save_model_checkpoint
    from ptxseg.config import save_config
    from ptxseg.model import build_model
    from ptxseg.postprocess import save_params

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**{"model.encoder": encoder})
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(seed)
    model = build_model(cfg.model, pretrained=False).eval()
    if decisive:
        head = model.net.segmentation_head[0]
        with torch.no_grad():
            head.weight.mul_(150.0)
            head.bias.mul_(150.0).sub_(13.0)
    save_model_checkpoint(model, run / "best.ckpt")
    if thresholds is not None:
        save_params(thresholds, run / "thresholds.json")
    return model


# --- training (training engineer) ----------------------------------------------------------


def synth_dataset(tmp_path_factory, n: int, size: int, seed: int) -> Path:
    """A synthetic png-layout dataset of ``n`` pairs, half positive."""
    from ptxseg.data.synthetic import generate

    root = tmp_path_factory.mktemp(f"synth{n}x{size}") / "data"
    generate(root, n=n, size=size, seed=seed, positive_fraction=0.5)
    return root


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """16 synthetic 64 px image/mask pairs (png layout, half positive, seed 0)."""
    return synth_dataset(tmp_path_factory, n=16, size=64, seed=0)


TINY_RUN_SETTINGS = {"train.epochs": 3, "optim.lr": 1e-3}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_data) -> Path:
    """A real run folder trained by ``ptxseg.train.fit`` on ``synth_data``: tiny config with
    ``TINY_RUN_SETTINGS`` (3 epochs, lr 1e-3); holds config.yaml, split.csv, best.ckpt,
    last.ckpt, metrics.csv, curves.png. Read-only for tests: copy it before changing it."""
    from ptxseg.train import fit

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    fit(tiny_config(**TINY_RUN_SETTINGS), synth_data, run, progress=False)
    return run


# --- evaluation (evaluation engineer) -----------------------------------------------------


def parse_html_report(path) -> dict:
    """Parse an HTML page strictly with ``html.parser``: every non-void element must be closed
    in order. Returns ``{"imgs": [decoded PNG bytes of each <img> data URI], "text": the
    visible text, "tags": {tag: count}}``. Raises AssertionError on a structural error or an
    <img> that is not an embedded PNG."""
    import base64
    from collections import Counter
    from html.parser import HTMLParser

    void = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    class _Checker(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.stack, self.imgs, self.text, self.tags = [], [], [], Counter()

        def handle_starttag(self, tag, attrs):
            self.tags[tag] += 1
            if tag == "img":
                src = dict(attrs).get("src") or ""
                prefix = "data:image/png;base64,"
                assert src.startswith(prefix), f"<img> without an embedded PNG: {src[:60]}"
                data = base64.b64decode(src[len(prefix) :], validate=True)
                assert data.startswith(b"\x89PNG\r\n\x1a\n"), "data URI is not a PNG"
                self.imgs.append(data)
            elif tag not in void:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
            self.stack.pop()

        def handle_data(self, data):
            self.text.append(data)

    checker = _Checker()
    checker.feed(Path(path).read_text(encoding="utf-8"))
    checker.close()
    assert not checker.stack, f"unclosed elements: {checker.stack}"
    return {"imgs": checker.imgs, "text": "".join(checker.text), "tags": dict(checker.tags)}
