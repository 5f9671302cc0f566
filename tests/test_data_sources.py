"""Layouts -> Records: png (real sample + built), siim (real DICOMs + built RLE CSV), ptx498,
csv manifest, detection, and the refusal to drop data silently."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from ptxseg.data.imageio import read_image, read_mask
from ptxseg.data.records import RleMask
from ptxseg.data.rle import encode
from ptxseg.data.sources import detect_layout, load_records, scan
from ptxseg.errors import DataError, PtxsegError


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr)
    return path


def _blob(h=8, w=8, at=(2, 3)):
    m = np.zeros((h, w), np.uint8)
    m[at[0]:at[0] + 2, at[1]:at[1] + 3] = 255
    return m


def test_sample_root_is_read_as_png(sample_dir):
    records, layout = load_records(sample_dir)
    assert layout == "png"  # png_images/ wins over dicom/ + rle/ in the same folder
    assert detect_layout(sample_dir) == "png"
    assert len(records) == 108
    assert sum(r.has_pneumothorax for r in records) == 43
    assert [r.id for r in records] == sorted(r.id for r in records)
    # the file names carry the label (N_{train,test}_{label}_.png): independent check
    for r in records:
        assert r.has_pneumothorax == (r.id.split("_")[2] == "1")
        assert r.mask.name == r.image.name and r.patient_id is None


def test_png_layout_built(tmp_path):
    _png(tmp_path / "png_images" / "b.png", np.full((8, 8), 90, np.uint8))
    _png(tmp_path / "png_masks" / "b.png", _blob())
    _png(tmp_path / "png_images" / "a.jpg", np.full((8, 8), 90, np.uint8))
    _png(tmp_path / "png_masks" / "a.png", np.zeros((8, 8), np.uint8))  # same stem, .png
    records, layout = load_records(tmp_path, "png")
    assert layout == "png"
    assert [(r.id, r.has_pneumothorax) for r in records] == [("a", False), ("b", True)]
    assert records[0].mask.name == "a.png"


def test_png_image_without_mask_is_an_error(tmp_path):
    _png(tmp_path / "png_images" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "png_images" / "b.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "png_masks" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="image without mask") as err:
        load_records(tmp_path)
    assert "b.png" in str(err.value)


def test_png_mask_without_image_and_duplicates_are_reported(tmp_path):
    _png(tmp_path / "png_images" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "png_images" / "a.jpg", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "png_masks" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "png_masks" / "z.png", np.zeros((8, 8), np.uint8))
    kinds = sorted(p.kind for p in scan(tmp_path).problems)
    assert kinds == ["duplicate-id", "missing-image"]
    with pytest.raises(DataError, match=r"and 1 more problem"):
        load_records(tmp_path)


def test_ptx498_layout(tmp_path):
    for site, n, positive in (("SiteA", 1, True), ("SiteA", 12, True), ("SiteB", 3, False)):
        d = tmp_path / site
        _png(d / f"{n}.1.img.png", np.full((8, 8), 100, np.uint8))
        _png(d / f"{n}.2.mask.png", _blob() if positive else np.zeros((8, 8), np.uint8))
        _png(d / f"{n}.3.merge.png", np.full((8, 8), 7, np.uint8))
        (d / f"{n}.nii.gz").write_bytes(b"\x1f\x8b")
    records, layout = load_records(tmp_path)
    assert layout == "ptx498"
    assert [r.id for r in records] == ["SiteA_1", "SiteA_12", "SiteB_3"]
    assert [r.has_pneumothorax for r in records] == [True, True, False]
    assert records[1].image.name == "12.1.img.png" and records[1].mask.name == "12.2.mask.png"
    (tmp_path / "SiteB" / "3.2.mask.png").unlink()
    with pytest.raises(DataError, match="image without mask"):
        load_records(tmp_path, "ptx498")
    _png(tmp_path / "SiteB" / "7.2.mask.png", _blob())  # a mask without its image
    found = scan(tmp_path, "ptx498")
    assert [(p.kind, p.path) for p in found.problems] == [
        ("missing-image", str(tmp_path / "SiteB" / "7.2.mask.png")),
        ("missing-mask", str(tmp_path / "SiteB" / "3.1.img.png")),
    ]


def _siim_folder(tmp_path, sample_dir, header="ImageId, EncodedPixels", bom=True):
    """Sample DICOMs (nested) + an RLE CSV: the masked one gets its mask split in two rows."""
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))[:4]
    masked = sample_dir / "dicom_masks"
    masked_uid = next(masked.glob("*.png")).stem
    chosen = [d for d in dicoms if d.stem != masked_uid][:3]
    chosen.append(sample_dir / "dicom" / f"{masked_uid}.dcm")
    for i, d in enumerate(chosen):
        dest = tmp_path / "ds" / "dicom-images-train" / f"sub{i}" / d.name
        dest.parent.mkdir(parents=True)
        shutil.copy(d, dest)
    full = cv2.imread(str(masked / f"{masked_uid}.png"), cv2.IMREAD_GRAYSCALE)
    full = (full > 0).astype(np.uint8)
    assert full.sum() > 0
    ys, xs = np.nonzero(full)
    cut = int(np.median(ys))
    top, bottom = full.copy(), full.copy()
    top[cut:], bottom[:cut] = 0, 0  # two "lesions" whose OR is the full mask
    lines = [header, f"{masked_uid}, {encode(top)}", f"{masked_uid}, {encode(bottom)}"]
    lines += [f"{chosen[0].stem}, -1", f"{chosen[1].stem},-1"]  # chosen[2]: not in the CSV
    text = "\r\n".join(lines) + "\r\n"
    bom_bytes = b"\xef\xbb\xbf" if bom else b""
    (tmp_path / "ds" / "train-rle.csv").write_bytes(bom_bytes + text.encode())
    return tmp_path / "ds", chosen, masked_uid, full


def test_siim_layout_built_from_sample_dicoms(tmp_path, sample_dir):
    root, chosen, masked_uid, full = _siim_folder(tmp_path, sample_dir)
    records, layout = load_records(root)
    assert layout == "siim"
    assert [r.id for r in records] == sorted(d.stem for d in chosen)
    by_id = {r.id: r for r in records}
    rec = by_id[masked_uid]
    assert rec.has_pneumothorax is True and isinstance(rec.mask, RleMask)
    assert len(rec.mask.rles) == 2 and rec.mask.source.endswith("train-rle.csv")
    image = read_image(rec.image)
    np.testing.assert_array_equal(read_mask(rec.mask, image.shape), full)  # rows OR-ed
    for d in chosen[:2]:
        r = by_id[d.stem]
        assert r.has_pneumothorax is False
        assert read_mask(r.mask, (1024, 1024)).sum() == 0
    missing = by_id[chosen[2].stem]
    assert missing.mask is None and missing.has_pneumothorax is None
    import pydicom

    for r in records:
        assert r.patient_id == pydicom.dcmread(r.image, stop_before_pixels=True).PatientID


def test_siim_fname_mask_header_and_orphan_rows(tmp_path, sample_dir):
    root, chosen, masked_uid, full = _siim_folder(tmp_path, sample_dir, "fname,mask", bom=True)
    with open(root / "train-rle.csv", "a") as fh:
        fh.write("1.2.3.not.here,-1\n")
    result = scan(root)
    assert result.layout == "siim"
    assert [p.kind for p in result.problems] == ["missing-image"]
    records, _ = load_records(root)  # rows without a DICOM are reported, not fatal
    assert len(records) == 4


def test_siim_refuses_ambiguous_csvs(tmp_path, sample_dir):
    root, *_ = _siim_folder(tmp_path, sample_dir)
    shutil.copy(root / "train-rle.csv", root / "stage_2_train.csv")
    assert load_records(root, "siim")[1] == "siim"  # a preferred name wins
    (root / "stage_2_train.csv").rename(root / "other.csv")
    (root / "train-rle.csv").rename(root / "more.csv")
    with pytest.raises(DataError) as exc:
        load_records(root, "siim")
    assert str(exc.value) == (
        f"{root}: several run-length CSVs found (more.csv, other.csv); choose one with "
        "--rle FILE (config key data.rle)"
    )


def test_csv_manifest(tmp_path):
    _png(tmp_path / "imgs" / "x1.png", np.full((8, 8), 80, np.uint8))
    _png(tmp_path / "masks" / "x1.png", _blob())
    _png(tmp_path / "imgs" / "x2.png", np.full((8, 8), 80, np.uint8))
    (tmp_path / "list.csv").write_text(
        "\ufeffimage, mask ,patient_id\nimgs/x1.png,masks/x1.png,P1\nimgs/x2.png,,P2\n",
        encoding="utf-8",
    )
    for root in (tmp_path / "list.csv", tmp_path):
        records, layout = load_records(root)
        assert layout == "csv"
        assert [(r.id, r.has_pneumothorax, r.patient_id) for r in records] == [
            ("x1", True, "P1"), ("x2", None, "P2")
        ]
    (tmp_path / "list.csv").write_text("image,mask\nimgs/x1.png,masks/absent.png\n")
    with pytest.raises(DataError, match="mask not found"):
        load_records(tmp_path / "list.csv")


def test_csv_without_expected_columns(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(DataError, match="expected columns image,mask, found path,label") as err:
        load_records(tmp_path / "list.csv", "csv")
    assert str(err.value).startswith(str(tmp_path / "list.csv"))
    (tmp_path / "rle.csv").write_text("id,rle\n1,-1\n")
    from ptxseg.data.siim import read_rle_csv

    with pytest.raises(DataError, match="expected columns ImageId,EncodedPixels"):
        read_rle_csv(tmp_path / "rle.csv")


def test_empty_missing_and_unknown_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset folder is empty") as err:
        load_records(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(DataError, match="dataset not found"):
        load_records(tmp_path / "absent")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        load_records(tmp_path / "junk")
    with pytest.raises(PtxsegError) as exc:
        load_records(tmp_path / "junk", "tiff")
    assert str(exc.value) == "--layout: unknown 'tiff' (valid: auto, png, siim, ptx498, csv)"
    (tmp_path / "empty_imgs" / "png_images").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_records(tmp_path / "empty_imgs")


def test_csv_manifest_ids_must_be_filename_safe(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "list.csv").write_text("id,image,mask\nsub/a,a.png,a.png\n")
    with pytest.raises(DataError, match="id 'sub/a' is not filename-safe"):
        load_records(tmp_path / "list.csv")


def _small_siim(root, make_dicom, n=6):
    """n synthetic 64 px images as DICOMs (SOPInstanceUID 1.2.826.0.1.N) and their masks."""
    from ptxseg.data.synthetic import generate

    recs = generate(root.parent / f"{root.name}-png", n=n, size=64, seed=1, positive_fraction=0.5)
    uids, masks = [], []
    for i, rec in enumerate(recs):
        uid = f"1.2.826.0.1.{i}"
        (root / "dicom").mkdir(parents=True, exist_ok=True)
        make_dicom(root / "dicom" / f"{uid}.dcm", cv2.imread(str(rec.image), 0),
                   SOPInstanceUID=uid, PatientID=f"P{i}")
        uids.append(uid)
        masks.append((cv2.imread(str(rec.mask), 0) > 0).astype(np.uint8))
    return uids, masks


def test_rle_option_picks_one_of_several_csvs(tmp_path, make_dicom):
    """--rle / data.rle chooses the CSV (relative: from the dataset folder; implies siim)."""
    root = tmp_path / "ds"
    uids, masks = _small_siim(root, make_dicom)
    good = "ImageId,EncodedPixels\n" + "".join(
        f"{u},{encode(m)}\n" for u, m in zip(uids, masks, strict=True)
    )
    (root / "rle").mkdir()
    (root / "rle" / "good.csv").write_text(good)
    (root / "rle" / "decoy.csv").write_text("ImageId,EncodedPixels\n" + "".join(
        f"{u},-1\n" for u in uids))
    (root / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"choose one with --rle FILE \(config key data.rle\)"):
        load_records(root)
    for rle in ("rle/good.csv", root / "rle" / "good.csv"):
        records, layout = load_records(root, rle=rle)
        assert layout == "siim" and [r.id for r in records] == uids
        for rec, mask in zip(records, masks, strict=True):
            assert rec.has_pneumothorax == bool(mask.any())
            np.testing.assert_array_equal(read_mask(rec.mask, mask.shape), mask)
            assert rec.mask.source == str(root / "rle" / "good.csv")
    records, _ = load_records(root, "siim", rle="rle/decoy.csv")
    assert not any(r.has_pneumothorax for r in records)
    with pytest.raises(DataError, match="run-length CSV not found"):
        load_records(root, rle="rle/absent.csv")
    with pytest.raises(DataError, match="not a run-length CSV .* found a,b"):
        load_records(root, rle="notes.csv")
    with pytest.raises(DataError, match="for the siim layout, not 'png'"):
        load_records(root, "png", rle="rle/good.csv")


def test_rle_errors_name_the_csv_line_and_image_id(tmp_path, make_dicom):
    """A row that cannot be decoded is named by CSV file, line number (blank lines counted)
    and ImageId, when read for training/evaluation and in inspect."""
    from ptxseg.data.inspect import inspect_dataset

    root = tmp_path / "ds"
    uids, masks = _small_siim(root, make_dicom, n=3)
    csv_path = root / "train-rle.csv"
    csv_path.write_text(
        "ImageId,EncodedPixels\n"
        f"{uids[0]},-1\n"
        "\n"
        f"{uids[1]},{encode(masks[1]) if masks[1].any() else '3 4'}\n"
        f"{uids[1]},1 2 3\n"  # line 5: an odd count
        f"{uids[2]},4000 200\n"  # line 6: past the end of a 64x64 image
    )
    records = {r.id: r for r in load_records(root)[0]}
    with pytest.raises(DataError) as exc:
        read_mask(records[uids[1]].mask, (64, 64))
    assert str(exc.value) == (
        f"{csv_path}: line 5, ImageId {uids[1]}: run-length row has an odd number of values (3)"
    )
    with pytest.raises(DataError) as exc:
        read_mask(records[uids[2]].mask, (64, 64))
    assert str(exc.value).startswith(
        f"{csv_path}: line 6, ImageId {uids[2]}: run-length row runs past the image"
    )
    report = inspect_dataset(root)
    found = sorted((p.path, p.problem.split(":")[0]) for p in report.problems)
    assert found == [
        (str(csv_path), f"line 5, ImageId {uids[1]}"),
        (str(csv_path), f"line 6, ImageId {uids[2]}"),
    ]
