"""The training Dataset, the aligned mask resize, and ``prepare`` (pre-resized copy)."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ptxseg.data.dataset import SegDataset
from ptxseg.data.prepare import prepare
from ptxseg.data.records import Record
from ptxseg.data.resize import resize_mask, resize_to
from ptxseg.data.sources import load_records
from ptxseg.errors import DataError


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


def test_resize_mask_stays_aligned_with_the_resized_image():
    image = np.full((1024, 1024), 10, np.uint8)
    mask = np.zeros((1024, 1024), np.uint8)
    cv2.ellipse(image, (400, 560), (180, 300), 25, 0, 360, 240, -1)
    cv2.ellipse(mask, (400, 560), (180, 300), 25, 0, 360, 1, -1)
    for size in (512, 96, 64):
        seen = resize_to(image, size) > 125
        ours = resize_mask(mask, size)
        assert set(np.unique(ours).tolist()) == {0, 1}
        assert np.linalg.norm(_centroid(seen) - _centroid(ours)) < 0.1
        nearest = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        assert np.linalg.norm(_centroid(seen) - _centroid(nearest)) > 0.3  # what we avoid


def test_dataset_decodes_resizes_and_returns_uint8_items(synth_data):
    records, _ = load_records(synth_data)
    ds = SegDataset(records, 32)
    assert len(ds) == 16
    for i in (0, 5):
        image, mask = ds[i]
        assert image.shape == mask.shape == (1, 32, 32)
        assert image.dtype == mask.dtype == torch.uint8
        raw = cv2.imread(str(records[i].image), cv2.IMREAD_GRAYSCALE)
        raw_mask = cv2.imread(str(records[i].mask), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(image[0].numpy(), resize_to(raw, 32))
        assert np.array_equal(mask[0].numpy(), resize_mask(raw_mask.astype(np.uint8), 32))
    assert any(ds[i][1].sum() > 0 for i in range(16))


def test_dataset_refuses_records_without_ground_truth(synth_data):
    rec = Record("x", synth_data / "png_images" / "synth_0000.png", None)
    with pytest.raises(DataError, match="1 record.*no ground-truth mask.*'x'"):
        SegDataset([rec], 64)


def test_unreadable_image_in_a_worker_is_one_line_naming_the_file(synth_data, tmp_path):
    records, _ = load_records(synth_data)
    bad = tmp_path / "broken.png"
    bad.write_bytes(records[0].image.read_bytes()[:60])  # truncated PNG
    recs = [Record("broken", bad, records[0].mask, True), *records[1:3]]
    loader = DataLoader(SegDataset(recs, 64), batch_size=3, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad}: ")


def test_prepare_writes_a_resized_png_layout_copy(tmp_path):
    from ptxseg.data.synthetic import generate

    source = generate(tmp_path / "big", n=6, size=128, seed=2)
    out = tmp_path / "small"
    records = prepare(tmp_path / "big", out, size=64, progress=False)
    assert [r.id for r in records] == [r.id for r in source]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "small"]  # no partial left
    reread, layout = load_records(out)  # through its manifest.csv: the original ids
    assert layout == "csv" and [r.id for r in reread] == [r.id for r in source]
    as_png, _ = load_records(out, "png")  # these ids are file-safe: the file names are the ids
    assert [r.id for r in as_png] == [r.id for r in source]
    assert [r.has_pneumothorax for r in reread] == [r.has_pneumothorax for r in source]
    for src, dst in zip(source, reread, strict=True):
        img = cv2.imread(str(dst.image), cv2.IMREAD_UNCHANGED)
        msk = cv2.imread(str(dst.mask), cv2.IMREAD_UNCHANGED)
        assert img.shape == msk.shape == (64, 64) and img.dtype == np.uint8
        assert set(np.unique(msk).tolist()) <= {0, 255}
        original = cv2.imread(str(src.image), cv2.IMREAD_GRAYSCALE)
        original_mask = (cv2.imread(str(src.mask), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
        assert np.array_equal(img, resize_to(original, 64))
        assert np.array_equal(msk // 255, resize_mask(original_mask, 64))
    with (out / "manifest.csv").open(newline="") as fh:
        manifest = list(csv.DictReader(fh))
    assert [row["id"] for row in manifest] == [r.id for r in source]
    assert [row["image"] for row in manifest] == [f"png_images/{r.id}.png" for r in source]
    assert all(row["patient_id"] == "" for row in manifest)  # none in a png-layout source
    with pytest.raises(DataError, match="not empty"):
        prepare(tmp_path / "big", out, size=64, progress=False)


def test_prepare_refuses_images_without_ground_truth_and_writes_nothing(tmp_path):
    img = np.full((40, 40), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    cv2.imwrite(str(tmp_path / "b.png"), img)
    cv2.imwrite(str(tmp_path / "a_mask.png"), np.zeros((40, 40), np.uint8))
    (tmp_path / "manifest.csv").write_text("image,mask\na.png,a_mask.png\nb.png,\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"1 record\(s\) have no ground-truth mask \(e.g. 'b'\)"):
        prepare(tmp_path / "manifest.csv", out, size=32, layout="csv", progress=False)
    assert not out.exists()


def test_safe_id_keeps_file_safe_ids_and_makes_the_rest_portable():
    """The one file-safe id rule (prepare's file names, predict's output names)."""
    from ptxseg.data.ids import safe_id

    for ident in ("0_test_1_", "1.2.276.0.7230010.3.1.4.8323329.5797.1517875190.762694",
                  "SiteA_3", "röntgen_7", "with space"):
        assert safe_id(ident) == ident
    assert safe_id("a/b\\c:d") == "a_b_c_d"
    assert safe_id(".hidden") == "_.hidden"
    assert safe_id("x.") == "x_" and safe_id("y. ") == "y_"  # Windows drops trailing dots
    assert safe_id("CON") == "CON_" and safe_id("nul.tar") == "nul_.tar"
    assert safe_id("bad\udcff") == "bad_xff"  # a non-UTF-8 byte from a file name
    assert safe_id("") == "_"


def test_prepare_maps_unsafe_ids_back_through_its_manifest(tmp_path):
    """Ids that cannot be file names (a manifest's 'a:b') get safe file names, and the copy
    is read back with the original ids."""
    img = np.full((40, 40), 100, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:15, 5:15] = 255
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), img)
        cv2.imwrite(str(tmp_path / f"{name}_m.png"), mask)
    (tmp_path / "list.csv").write_text(
        "id,image,mask,patient_id\nx:1,a.png,a_m.png,P1\n.y,b.png,b_m.png,P2\n"
    )
    out = tmp_path / "out"
    records = prepare(tmp_path / "list.csv", out, size=32, progress=False)
    assert [(r.id, r.image.name, r.patient_id) for r in records] == [
        (".y", "_.y.png", "P2"), ("x:1", "x_1.png", "P1")
    ]
    reread, layout = load_records(out)
    assert layout == "csv"
    assert [(r.id, r.image.name, r.patient_id, r.has_pneumothorax) for r in reread] == [
        (".y", "_.y.png", "P2", True), ("x:1", "x_1.png", "P1", True)
    ]
