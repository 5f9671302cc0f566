"""Fuzzing the readers: hostile bytes, run-length rows, CSVs and thresholds files.

Only the project's own typed errors (:class:`~ptxseg.errors.PtxsegError`) may come out: never
another exception, a hang, or an unbounded allocation. Examples are bounded and derandomized
(the same inputs in every run, so CI is stable); raise ``PTXSEG_FUZZ_EXAMPLES`` locally for a
longer campaign, e.g. ``PTXSEG_FUZZ_EXAMPLES=5000 pytest tests/test_reliability_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ptxseg.data.imageio import DEFAULT_MAX_PIXELS, probe_image, read_image, read_mask
from ptxseg.data.records import RleMask
from ptxseg.data.rle import MAX_PIXELS, decode, decode_rows
from ptxseg.data.siim import read_rle_csv
from ptxseg.data.sources import load_records
from ptxseg.data.split import read_split
from ptxseg.errors import PtxsegError, one_line
from ptxseg.postprocess import load_params, params_from_dict
from tests.conftest import SAMPLE, subprocess_env, write_dicom

N = int(os.environ.get("PTXSEG_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=N or 60,
    deadline=None,
    derandomize=not N,
    database=None,  # no .hypothesis/ folder in the repo
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom/Pillow warn about what we break


def only_typed_errors(fn, *args, **kwargs):
    """Call ``fn``; a PtxsegError is fine (returned), any other exception fails the test.
    (Messages may quote data with newlines; the CLI prints them escaped, on one line.)"""
    try:
        return fn(*args, **kwargs)
    except PtxsegError as exc:
        assert "\n" not in one_line(str(exc)) and str(exc).strip(), repr(exc)
        return exc


# ---------------------------------------------------------------------------------------------
# image files: random bytes, truncated and mutated real files


def _base_files() -> list[tuple[str, bytes]]:
    """Small valid files of every format read (PNG 8/16-bit/RGB, JPEG, DICOM 8/16-bit), plus
    the real SIIM PNG and JPEG-compressed DICOM where the sample is present."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    out = [
        (".png", cv2.imencode(".png", img)[1].tobytes()),
        (".png", cv2.imencode(".png", img.astype(np.uint16) * 257)[1].tobytes()),
        (".png", cv2.imencode(".png", np.dstack([img, img, img]))[1].tobytes()),
        (".jpg", cv2.imencode(".jpg", img)[1].tobytes()),
    ]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ptxseg-fuzz-{os.getpid()}.dcm"
    for pixels, attrs in (
        (img, {}),
        (img.astype(np.uint16) * 16, {"WindowCenter": "2000", "WindowWidth": "3000",
                                       "PhotometricInterpretation": "MONOCHROME1"}),
    ):  # fmt: skip
        write_dicom(tmp, pixels, **attrs)
        out.append((".dcm", tmp.read_bytes()))
    tmp.unlink()
    if (SAMPLE / "png_images").is_dir():
        out.append((".png", (SAMPLE / "png_images" / "0_train_0_.png").read_bytes()))
        out.append((".dcm", sorted((SAMPLE / "dicom").glob("*.dcm"))[0].read_bytes()))
    return out


BASES = _base_files()
SUFFIXES = [".png", ".jpg", ".jpeg", ".dcm", ".tif", ".bmp", ""]


def _check_readers(path: Path) -> None:
    img = only_typed_errors(read_image, path)
    if isinstance(img, np.ndarray):
        assert img.dtype == np.uint8 and img.ndim == 2 and min(img.shape) > 0
    info = only_typed_errors(probe_image, path)
    if not isinstance(info, PtxsegError):
        assert info.width > 0 and info.height > 0
    mask = only_typed_errors(read_mask, path, (40, 56))
    if isinstance(mask, np.ndarray):
        assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 1}


@FUZZ
@given(data=st.binary(max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_as_images(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("rand") / f"x{suffix}"
    path.write_bytes(data)
    _check_readers(path)


@FUZZ
@given(st.data())
def test_truncated_and_mutated_images(tmp_path_factory, data):
    suffix, base = data.draw(st.sampled_from(BASES), label="base")
    blob = bytearray(base[: data.draw(st.integers(0, len(base)), label="truncate at")])
    edits = data.draw(
        st.lists(
            st.tuples(st.one_of(st.integers(0, 400), st.integers(0, 1 << 30)), st.integers(0, 255)),
            max_size=8,
        ),
        label="edits",
    )
    for pos, byte in edits:
        if blob:
            blob[pos % len(blob)] = byte
    path = tmp_path_factory.mktemp("mut") / f"x{suffix}"
    path.write_bytes(bytes(blob))
    _check_readers(path)


_dicom_values = {
    "Rows": st.sampled_from([0, 1, 40, 65535]),
    "Columns": st.sampled_from([0, 1, 56, 65535]),
    "BitsAllocated": st.sampled_from([0, 1, 3, 8, 16, 32, 64]),
    "BitsStored": st.sampled_from([0, 8, 12, 16, 40]),
    "SamplesPerPixel": st.sampled_from([0, 1, 3, 4]),
    "NumberOfFrames": st.sampled_from(["1", "2", "-3", "0", "100000"]),
    "PixelRepresentation": st.sampled_from([0, 1, 5]),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "", "FOO"]
    ),
    "WindowCenter": st.sampled_from(["40", "1e300", "nan", ["1", "2"], []]),
    "WindowWidth": st.sampled_from(["0", "1", "-5", "80", []]),
    "RescaleSlope": st.sampled_from(["1", "0", "nan", "1e400", "-2"]),
    "RescaleIntercept": st.sampled_from(["0", "-1024", "inf"]),
    "PixelData": st.sampled_from([b"", b"\x00", b"\x01" * 2240, b"\x02" * 100_000]),
}


@FUZZ
@given(attrs=st.fixed_dictionaries({}, optional=_dicom_values))
def test_dicom_headers_with_hostile_values(tmp_path_factory, attrs):
    path = tmp_path_factory.mktemp("dcm") / "x.dcm"
    pixels = (np.arange(40 * 56) % 251).astype(np.uint8).reshape(40, 56)
    try:
        write_dicom(path, pixels, **attrs)
    except (ValueError, TypeError, OverflowError):
        return  # pydicom refuses to write this combination
    _check_readers(path)
    img = only_typed_errors(read_image, path)
    if isinstance(img, np.ndarray):  # the header's size, never a reinterpretation of the data
        assert img.shape == (attrs.get("Rows", 40), attrs.get("Columns", 56))


# ---------------------------------------------------------------------------------------------
# run-length rows

_numbers = st.one_of(
    st.integers(-5, 3000), st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, -1])
)
_rle_rows = st.one_of(
    st.text(max_size=200),
    st.lists(_numbers, max_size=12).map(lambda xs: " ".join(map(str, xs))),
    st.lists(st.sampled_from(["1", "2", "-1", "", " ", "\t", "1e3", "0x10", "nan", "١", "+3"]),
             max_size=10).map(" ".join),
)  # fmt: skip


@FUZZ
@given(rows=st.lists(_rle_rows, max_size=4), h=st.integers(1, 48), w=st.integers(1, 48))
def test_random_run_length_rows(rows, h, w):
    for row in rows:
        mask = only_typed_errors(decode, row, h, w, source="rows.csv")
        if isinstance(mask, np.ndarray):
            assert mask.shape == (h, w) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
    mask = only_typed_errors(read_mask, RleMask(tuple(rows), "rows.csv"), (h, w))
    if isinstance(mask, PtxsegError):
        assert str(mask).startswith("rows.csv: ")


@FUZZ
@given(h=st.integers(-(2**40), 2**40), w=st.integers(-(2**40), 2**40), row=_rle_rows)
def test_run_length_image_sizes_are_checked_before_allocating(h, w, row):
    if h > 0 and w > 0 and h * w <= MAX_PIXELS:
        return  # a size that is decoded (up to 256 Mpx): covered above at small sizes
    assert isinstance(only_typed_errors(decode_rows, [row], h, w, source="x.csv"), PtxsegError)


# ---------------------------------------------------------------------------------------------
# CSVs (manifests, run-length CSVs, split.csv) and thresholds.json

_cells = st.one_of(
    st.sampled_from(
        ["image", "mask", "id", "patient_id", "ImageId", "EncodedPixels", " EncodedPixels",
         "fname", "split", "train", "val", "a.png", "m.png", "missing.png", "../a.png",
         "/etc/passwd", "~/a.png", "$HOME/a.png", "", " ", "-1", "1 2", "0 3000",
         "99999999999999999999999", "1e309", "nan", "\x00", "é", ".", "..", "a/b", "x" * 300,
         '"', '""', "\ufeff", "\r"]
    ),
    st.text(max_size=12),
)  # fmt: skip
_csv_text = st.builds(
    lambda prefix, rows: prefix + "".join(",".join(r) + "\n" for r in rows),
    st.sampled_from(["", "\ufeff", "image,mask\n", "image,mask,id\n", "ImageId,EncodedPixels\n",
                     "\ufeffImageId, EncodedPixels\n", "fname,mask\n", "id,split\n"]),
    st.lists(st.lists(_cells, min_size=0, max_size=5), max_size=6),
)  # fmt: skip


@FUZZ
@given(text=_csv_text, encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
@example(text="image,mask\n" + "x" * 300 + ".png,m.png\n", encoding="utf-8")  # ENAMETOOLONG
@example(text='image,mask\n"a\n.png",\x00\n', encoding="utf-8")
def test_hostile_csv_files(tmp_path_factory, text, encoding):
    folder = tmp_path_factory.mktemp("csv")
    img = np.full((40, 56), 100, np.uint8)
    cv2.imwrite(str(folder / "a.png"), img)
    cv2.imwrite(str(folder / "m.png"), (img > 0).astype(np.uint8) * 255)
    path = folder / "data.csv"
    path.write_bytes(text.encode(encoding, errors="replace"))
    found = only_typed_errors(load_records, path, "csv")
    if not isinstance(found, PtxsegError):
        records, layout = found
        assert layout == "csv" and records
        for rec in records:
            assert rec.image.is_file() and "/" not in rec.id
    only_typed_errors(read_rle_csv, path)
    only_typed_errors(read_split, path)


@FUZZ
@given(text=_csv_text)
def test_hostile_run_length_csv_of_a_siim_folder(tmp_path_factory, text):
    """A siim folder: one DICOM + a fuzzed run-length CSV, then every mask decoded."""
    folder = tmp_path_factory.mktemp("siim")
    write_dicom(folder / "x.dcm", np.zeros((40, 56), np.uint8), SOPInstanceUID="1.2.3")
    (folder / "train-rle.csv").write_text(
        "ImageId,EncodedPixels\n" + text.replace("a.png", "1.2.3"), encoding="utf-8"
    )
    found = only_typed_errors(load_records, folder, "siim")
    if not isinstance(found, PtxsegError):
        for rec in found[0]:
            if rec.mask is not None:
                only_typed_errors(read_mask, rec.mask, (40, 56))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
_params = st.dictionaries(
    st.sampled_from(["mode", "binary_threshold", "removal_area", "top_threshold", "min_area",
                     "bottom_threshold", "size"]),
    st.one_of(_json, st.sampled_from(["pixel", "triplet"])),
)  # fmt: skip


@FUZZ
@given(obj=st.one_of(_params, _json))
def test_hostile_thresholds_files(tmp_path_factory, obj):
    path = tmp_path_factory.mktemp("thr") / "thresholds.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    params = only_typed_errors(load_params, path)
    if not isinstance(params, PtxsegError):
        assert params.mode in ("pixel", "triplet")
    only_typed_errors(params_from_dict, obj)


# ---------------------------------------------------------------------------------------------
# headers claiming huge images: refused before anything big is allocated


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HUGE = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from ptxseg.errors import one_line
from ptxseg.data.imageio import probe_image, read_image
from ptxseg.data.rle import decode
from ptxseg.errors import PtxsegError
folder = Path(sys.argv[1])
np.zeros(1 << 20, np.uint8).sum()  # numpy's own buffers set up before the limit
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), resource.RLIM_INFINITY))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cases = {
    "png 40000x25000": lambda: read_image(folder / "huge.png"),
    "png probe": lambda: probe_image(folder / "huge.png"),
    "dicom 31623x31623": lambda: read_image(folder / "huge.dcm"),
    "dicom 1024x1024 x 1000 frames": lambda: read_image(folder / "frames.dcm"),
    "run-length 31623x31623": lambda: decode("0 1", 31623, 31623),
    "run-length past a 1024x1024 image": lambda: decode("0 1000000000", 1024, 1024),
}
out = {}
for name, fn in cases.items():
    t = time.perf_counter()
    try:
        fn()
        out[name] = "no error"
    except PtxsegError as exc:
        out[name] = "refused: " + str(exc)
    except BaseException as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
    out[name] += f" ({time.perf_counter() - t:.2f} s)"
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": out, "rss_growth_mb": (rss - rss0) / 1024}))
"""


def test_headers_claiming_a_billion_pixels_are_refused_before_allocating(tmp_path):
    """In a process whose address space is capped at 300 MB above its start: every case is a
    typed refusal within a second, and the peak RSS barely moves (a 10^9-pixel uint8 buffer
    alone would be 1 GB)."""
    (tmp_path / "huge.png").write_bytes(_png_header(40000, 25000))
    write_dicom(tmp_path / "huge.dcm", np.zeros((4, 4), np.uint8), Rows=31623, Columns=31623)
    write_dicom(tmp_path / "frames.dcm", np.zeros((4, 4), np.uint8), Rows=1024, Columns=1024,
                NumberOfFrames="1000")  # fmt: skip
    env = subprocess_env()
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", HUGE, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, outcome in report["results"].items():
        assert outcome.startswith("refused: "), (name, outcome)
        assert float(outcome.rsplit("(", 1)[1].split()[0]) < 1.0, (name, outcome)
    limit = f"above the limit of {DEFAULT_MAX_PIXELS} pixels"
    assert limit in report["results"]["dicom 31623x31623"]
    assert "1000 frame(s)" in report["results"]["dicom 1024x1024 x 1000 frames"]
    assert report["rss_growth_mb"] < 50, report
