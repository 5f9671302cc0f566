"""How `ptxseg predict` turns INPUT arguments into (id, file) pairs: recursive folders, dataset
layouts, suffix-less DICOMs, hidden files, the output folder, duplicate names. No model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ptxseg.data.ids import safe_id
from ptxseg.data.inputs import collect_inputs, scan_folder, unique_ids
from ptxseg.errors import DataError
from tests.conftest import write_dicom


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8), value, np.uint8))
    return path


def test_unique_ids_are_deterministic_and_case_insensitive():
    p = [Path(f"/x/{i}") for i in range(5)]
    got = unique_ids([("a", p[0]), ("a", p[1]), ("A", p[2]), ("a__2", p[3]), ("b", p[4])])
    # a__2 exists as a real name, so the second "a" skips to a__3; "A" collides on
    # case-insensitive disks and becomes A__4; the real a__2 keeps its own name
    assert [e.id for e in got] == ["a", "a__3", "A__4", "a__2", "b"]
    assert [e.path for e in got] == p
    assert len({e.id.casefold() for e in got}) == 5


def test_safe_id_replaces_separators_and_reserved_characters():
    assert safe_id("Site1/3") == "Site1_3"
    assert safe_id('a\\b:c*d?"e<f>g|h') == "a_b_c_d__e_f_g_h"
    assert safe_id(".hidden") == "_.hidden"
    assert safe_id("1.2.840.113619.2.55") == "1.2.840.113619.2.55"


def test_folder_scan_is_recursive_sorted_and_skips_hidden_other_and_output(tmp_path):
    root = tmp_path / "in"
    _png(root / "b" / "z.png")
    _png(root / "a.PNG")
    _png(root / "c" / "deep" / "x.jpg")
    write_dicom(root / "IM0001", np.zeros((4, 4), np.uint8))  # suffix-less DICOM
    (root / "README").write_text("no suffix, not DICOM")
    (root / "notes.txt").write_text("x")
    _png(root / ".hidden.png")
    _png(root / ".cache" / "y.png")
    _png(root / "out" / "masks" / "z.png")  # a previous run's output inside the input
    images, skipped = scan_folder(root, exclude=[(root / "out").resolve()])
    rel = [p.relative_to(root).as_posix() for p in images]
    assert rel == ["IM0001", "a.PNG", "b/z.png", "c/deep/x.jpg"]
    assert [p.name for p in skipped] == ["README", "notes.txt"]


def test_png_dataset_folder_gives_only_its_images(tmp_path):
    ds = tmp_path / "ds"
    for name in ("1.png", "2.png"):
        _png(ds / "png_images" / name)
        _png(ds / "png_masks" / name, 0)
    _png(ds / "png_images" / "3.png")  # no mask: still an image to predict
    got = collect_inputs([ds])
    assert [(e.id, e.path.relative_to(ds).as_posix()) for e in got.entries] == [
        ("1", "png_images/1.png"),
        ("2", "png_images/2.png"),
        ("3", "png_images/3.png"),
    ]
    assert any("read as a png dataset: 3 images" in n for n in got.notes)


def test_dicom_folder_without_csv_is_read_as_plain_files(tmp_path):
    folder = tmp_path / "dcm"
    (folder / "sub").mkdir(parents=True)
    write_dicom(folder / "a.dcm", np.zeros((4, 4), np.uint8), SOPInstanceUID="1.2.3")
    write_dicom(folder / "sub" / "b.DCM", np.zeros((4, 4), np.uint8), SOPInstanceUID="1.2.4")
    got = collect_inputs([folder])
    assert [e.id for e in got.entries] == ["a", "b"]


def test_files_and_folders_mix_in_argument_order_and_duplicates_are_predicted_once(tmp_path):
    one = _png(tmp_path / "x" / "scan.png")
    two = _png(tmp_path / "y" / "scan.png")
    other = _png(tmp_path / "y" / "other.png")
    got = collect_inputs([two, tmp_path / "x", tmp_path / "y"])
    assert [(e.id, e.path) for e in got.entries] == [
        ("scan", two),
        ("scan__2", one),
        ("other", other),
    ]
    assert any("named more than once, predicted once" in n for n in got.notes)


def test_a_file_named_explicitly_is_kept_whatever_its_suffix(tmp_path):
    weird = tmp_path / "scan.xyz"
    weird.write_bytes(b"not an image")
    assert [e.path for e in collect_inputs([weird]).entries] == [weird]  # reported later


@pytest.mark.parametrize("case", ["missing", "empty", "only-other-files"])
def test_nothing_to_predict_is_an_error_naming_the_input(tmp_path, case):
    target = tmp_path / "in"
    if case != "missing":
        target.mkdir()
    if case == "only-other-files":
        (target / "a.txt").write_text("x")
    with pytest.raises(DataError) as info:
        collect_inputs([target])
    expected = "no such file or folder" if case == "missing" else "no images found"
    assert str(info.value).startswith(f"{target}: {expected}")


def test_manifest_csv_input_gives_its_images(tmp_path):
    a = _png(tmp_path / "imgs" / "a.png")
    b = _png(tmp_path / "imgs" / "b.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("image,mask,id\nimgs/b.png,,second\nimgs/a.png,,first\n")
    got = collect_inputs([manifest])
    assert sorted((e.id, e.path) for e in got.entries) == [("first", a), ("second", b)]
    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="a CSV input must be a manifest with columns image,mask"):
        collect_inputs([other])


def test_safe_id_caps_long_names_and_keeps_them_distinct(tmp_path):
    a, b = "é" * 150 + "a", "é" * 150 + "b"  # 301 bytes each, differing at the end
    ida, idb = safe_id(a), safe_id(b)
    assert ida != idb
    assert len(ida.encode()) <= 200 and len(idb.encode()) <= 200
    assert ida.startswith("é" * 90)
    (tmp_path / f"{ida}.png").write_bytes(b"x")  # a valid file name, with room for temp names
    assert safe_id("short") == "short"
