"""Every command in the README runs, so the docs cannot rot.

The ``ptxseg`` (and ``python -c``) lines of the README's ```bash blocks are extracted and run in
order in a sandbox whose ``data/`` folders are built from the real SIIM sample in each layout
(``data/siim-png``, ``data/siim-dicom``, ``data/ptx498``, ``data/new-xrays``). Two
substitutions keep it CPU-sized, and are the only ones: training commands (train, demo) get
tiny-model overrides appended, and the offline-weights recipe saves random (not ImageNet)
weights because CI has no internet. ```text blocks are output listings and launcher examples
(multi-node torchrun/SLURM), not run.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
TINY = [
    "--set", "model.encoder=efficientnet-b0",
    "--set", "model.encoder_weights=null",
    "--set", "data.size=64",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=4",
    "--set", "data.workers=0",
    "--set", "train.accelerator=cpu",
]


def readme_commands(text: str) -> list[str]:
    """The commands of the README's bash blocks (continuation lines joined, comments and
    ``make`` targets dropped: ``make`` is what CI itself runs)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("make "):
                continue
            if line.startswith(("ptxseg ", "python -c ")):
                commands.append(line)
            elif line:
                raise AssertionError(f"README command not covered by this test: {line}")
    return commands


def test_readme_has_the_two_commands_first():
    text = README.read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="module")
def sandbox(sample_dir, tmp_path_factory):
    """data/ folders in every layout the README uses, built from the real sample."""
    from ptxseg.data.imageio import read_mask
    from ptxseg.data.rle import encode

    root = tmp_path_factory.mktemp("readme")
    names = sorted(p.name for p in (sample_dir / "png_images").glob("*.png"))
    positives = [n for n in names if n.endswith("_1_.png")]
    negatives = [n for n in names if n.endswith("_0_.png")]
    subset = positives[:8] + negatives[:8]
    for name in subset:
        for sub in ("png_images", "png_masks"):
            _link(sample_dir / sub / name, root / "data/siim-png" / sub / name)
    for index in ("stage_1_train_images.csv", "stage_1_test_images.csv"):  # the re-packaging's
        _link(sample_dir / index, root / "data/siim-png" / index)
    # original challenge layout: DICOMs one level down + a run-length CSV (BOM, leading space)
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))
    rows = []
    for path in dicoms:
        # one folder per image, named by the last UID component (never a hidden ".xxx" folder)
        folder = path.stem.rsplit(".", 1)[-1]
        _link(path, root / "data/siim-dicom/dicom-images" / folder / path.name)
        mask_png = sample_dir / "dicom_masks" / f"{path.stem}.png"
        rle = encode(read_mask(mask_png, (1024, 1024))) if mask_png.exists() else "-1"
        rows.append((path.stem, rle))
    with open(root / "data/siim-dicom/train-rle.csv", "w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageId", " EncodedPixels"])
        w.writerows(rows)
    for i, name in enumerate(positives[:4], start=1):
        site = root / "data/ptx498" / ("SiteA" if i <= 2 else "SiteB")
        _link(sample_dir / "png_images" / name, site / f"{i}.1.img.png")
        _link(sample_dir / "png_masks" / name, site / f"{i}.2.mask.png")
    for name in (positives[8], negatives[8]):
        _link(sample_dir / "png_images" / name, root / "data/new-xrays" / name)
    _link(dicoms[0], root / "data/new-xrays/dicom" / dicoms[0].name)
    return root


def _adapt(cmd: str) -> list[str]:
    args = shlex.split(cmd)
    if args[0] == "ptxseg" and args[1] in ("train", "demo"):
        args += TINY
    if args[1] == "demo":
        args += ["--n-train", "24", "--n-test", "8", "--image-size", "64"]
    return args


def test_every_readme_command_runs(sandbox, sample_dir, monkeypatch):
    from ptxseg.cli import main

    monkeypatch.chdir(sandbox)
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 15
    for cmd in commands:
        args = _adapt(cmd)
        if args[0] == "python":
            # the offline-weights recipe, with random weights: CI has no internet
            code = args[2].replace("encoder_weights='imagenet'", "encoder_weights=None")
            subprocess.run([sys.executable, "-c", code], check=True, cwd=sandbox)
            continue
        code = main(args[1:])
        assert code == 0, f"README command failed (exit {code}): {cmd}"

    # what the commands were meant to produce
    run = sandbox / "runs/siim"
    for name in ("config.yaml", "split.csv", "best.ckpt", "last.ckpt", "metrics.csv",
                 "curves.png", "thresholds.json", "model.onnx"):
        assert (run / name).stat().st_size > 0, name
    for out in ("eval-val", "eval-ptx498"):
        assert (run / out / "metrics.json").exists() and (run / out / "report.html").exists()
    subs = list(csv.DictReader(open(sandbox / "predictions/submission.csv")))
    dicom_row = [r for r in subs if r["ImageId"].startswith("1.2.276.0.7230010")]
    assert len(subs) == 3 and len(dicom_row) == 1
    # --id-map: the PNG re-packaging's submission carries the SIIM ImageIds of its index files
    index = {}
    for name in ("stage_1_train_images.csv", "stage_1_test_images.csv"):
        rows = csv.DictReader(open(sample_dir / name))
        index.update({r["new_filename"]: r["ImageId"] for r in rows})
    results = list(csv.DictReader(open(sandbox / "predictions-siim/results.csv")))
    siim_subs = list(csv.DictReader(open(sandbox / "predictions-siim/submission.csv")))
    assert len(results) == 16
    assert [r["ImageId"] for r in siim_subs] == [
        index[Path(r["source"]).name] for r in results
    ]
    torch_masks = sorted(p.name for p in (sandbox / "predictions/masks").iterdir())
    onnx_masks = sorted(p.name for p in (sandbox / "predictions-onnx/masks").iterdir())
    assert torch_masks == onnx_masks and len(torch_masks) == 3
    # --dicom-seg on the SIIM DICOMs: a SEG per DICOM referencing it, cm² from PixelSpacing
    import highdicom as hd
    import pydicom

    seg_rows = list(csv.DictReader(open(sandbox / "predictions-dicom/results.csv")))
    assert len(seg_rows) == 12
    for row in seg_rows:
        assert row["status"] == "ok" and row["dicom_seg"] == f"dicom_seg/{row['id']}.dcm"
        src = pydicom.dcmread(row["source"], stop_before_pixels=True)
        seg = hd.seg.segread(sandbox / "predictions-dicom" / row["dicom_seg"])
        assert seg.get_source_image_uids() == [
            (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
        ]
        row_mm, col_mm = (float(v) for v in src.PixelSpacing)
        cm2 = int(row["area_px"]) * row_mm * col_mm / 100
        assert abs(float(row["area_cm2"]) - cm2) < 5e-5
        assert row["area_note"].startswith("from PixelSpacing")
    # evaluate: lesion measures in per_image.csv (PNG: no cm², with the reason), intervals
    per_image = list(csv.DictReader(open(run / "eval-val/per_image.csv")))
    assert {r["area_note"] for r in per_image} == {"no pixel spacing (.png image)"}
    assert {r["area_cm2"] for r in per_image} == {""}
    metrics = json.loads((run / "eval-val/metrics.json").read_text())
    assert metrics["confidence_intervals"]["seed"] == 0
    assert (sandbox / "data/siim-512/manifest.csv").exists()
    assert (sandbox / "runs/siim-dicom/best.ckpt").exists()
    assert (sandbox / "demo-small/report.html").exists()
    assert (sandbox / "effb4-imagenet.pth").stat().st_size > 1_000_000
    # cross-validation and ensembles
    cv = sandbox / "runs/siim-cv"
    assert sorted(p.name for p in cv.glob("fold-*/best.ckpt")) == ["best.ckpt"] * 3
    assert json.loads((cv / "thresholds.json").read_text())["out_of_fold"]["k"] == 3
    assert len(json.loads((cv / "eval-ptx498/metrics.json").read_text())["members"]) == 3
    assert len(list((sandbox / "predictions-cv/probs").glob("*.npy"))) == 3
    two = json.loads((sandbox / "predictions-two/predict.json").read_text())
    assert two["combine"] == "mean probability" and len(two["members"]) == 2


def _output_paths(command: str) -> list[str]:
    """The folders and files a README command writes: ``--out X``, ``--kaggle-csv X`` and the
    OUT argument of ``synth``/``prepare``."""
    args = shlex.split(command)
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--kaggle-csv")]
    if args[:2] in (["ptxseg", "synth"], ["ptxseg", "prepare"]):
        positional = [a for a in args[2:] if not a.startswith("-")]
        paths.append(positional[1] if args[1] == "prepare" else positional[0])
    return paths


def test_readme_outputs_are_ignored_by_git():
    """Every folder or file the README's commands write in the project root is git-ignored, so
    following the README never leaves untracked data or results to commit by mistake."""
    import shutil

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = sorted({p for c in readme_commands(README.read_text(encoding="utf-8"))
                      for p in _output_paths(c)})
    assert "predictions" in outputs and "demo-small" in outputs  # the parser found them
    outputs += ["demo"]  # make demo

    def ignored(path: str) -> bool:  # a path that does not exist yet: as a file, or a folder
        return any(
            subprocess.run(["git", "check-ignore", "-q", "--no-index", p], cwd=REPO).returncode
            == 0
            for p in (path, f"{path}/x.png")
        )

    not_ignored = [p for p in outputs if not ignored(p)]
    assert not not_ignored, f"README outputs not in .gitignore: {not_ignored}"


def test_make_takes_torch_from_the_given_index(tmp_path):
    """``make demo TORCH_INDEX=URL`` installs torch/torchvision from that index before the
    project (the CPU-only route of the README); without it, nothing extra runs."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make not installed")
    url = "https://download.pytorch.org/whl/cpu"
    venv = tmp_path / "venv"

    def dry(*extra: str) -> list[str]:
        out = subprocess.run(
            ["make", "-n", "install", f"VENV={venv}", *extra],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
        return [line for line in out.splitlines() if "pip install" in line]

    with_index = dry(f"TORCH_INDEX={url}")
    assert len(with_index) == 2
    assert "torch torchvision" in with_index[0] and f"--index-url {url}" in with_index[0]
    assert '-e ".[dev]"' in with_index[1]
    assert len(dry()) == 1 and "--index-url" not in dry()[0]
    assert f"make demo TORCH_INDEX={url}" in README.read_text(encoding="utf-8")


def test_make_says_what_it_installs_and_shows_pips_progress(tmp_path):
    """``make demo`` on a fresh machine installs for minutes: make says so before pip starts,
    and pip runs without -q and with its progress bar. Run for real against a stand-in
    interpreter that records the arguments pip was given and prints like pip."""
    import os
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text('#!/bin/sh\necho "PIP-ARGS: $*"\necho "Collecting torch"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # also under `make test`
    out = subprocess.run(["make", "--no-print-directory", "install", f"VENV={venv}"], cwd=REPO,
                         capture_output=True, text=True, check=True,
                         env=env).stdout.splitlines()  # fmt: skip
    said = next(i for i, line in enumerate(out) if line.startswith("make: installing ptxseg"))
    pip = [i for i, line in enumerate(out) if line.startswith("PIP-ARGS: ")]
    assert pip and said < pip[0]
    assert "minutes" in out[said] and "pip's progress follows" in out[said]
    for i in pip:
        args = out[i].split()
        assert "-q" not in args and "--quiet" not in args
        assert args[args.index("--progress-bar") + 1] == "on"
    assert out[pip[-1] + 1] == "Collecting torch"  # pip's own lines reach the user
    assert out[-1] == f"make: installed; {venv}/bin/ptxseg is ready"
    assert (venv / ".ptxseg-installed").exists()
