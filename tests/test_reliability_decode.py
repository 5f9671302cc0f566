"""Untrusted bytes to pixels (issue 26, items 1, 2, 14, 19), for files and uploads alike.

- Only PNG, JPEG, TIFF, BMP and DICOM are decoded, recognised by their magic bytes before any
  decoder sees them: PostScript never reaches Pillow's EPS plugin (Ghostscript), nor do GIF,
  WebP, JPEG 2000 files, PDF...
- Decoded pixels are bounded (``PTXSEG_MAX_PIXELS``) from the header before decoding: PNG
  IHDR, JPEG SOF, TIFF, BMP, and every DICOM transfer syntax (a deflated data set is inflated
  no further than its header allows; a JPEG frame or an RLE segment may not claim more than the
  limit or its header).
- DICOM objects that are not radiographs (SEG, SR, CT ...) are refused by SOP class.
- One DICOM reader: a file and the same bytes uploaded give the same message (a cut file is
  "truncated", a corrupt header is not); pydicom's warnings name the file.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptxseg.data.imageio import (
    UnsupportedImage,
    load_pair,
    probe_image,
    read_image,
    read_image_bytes,
    read_image_header,
    read_mask_raw,
)
from ptxseg.data.records import Record
from ptxseg.errors import DataError
from tests.conftest import REPO, make_run, run_bounded, subprocess_env
from tests.decode_util import (
    CR_SOP_CLASS,
    CT_SOP_CLASS,
    DX_SOP_CLASS,
    POSTSCRIPT_LOOP,
    SEG_SOP_CLASS,
    SR_SOP_CLASS,
    bmp_header,
    deflated_dicom,
    deflated_dicom_bomb,
    dicom_of_class,
    dos_eps,
    encapsulated_dicom,
    jpeg_header,
    png_bomb,
    postscript,
    rle_bomb,
    tiff_header,
)

SRC = REPO / "src" / "ptxseg"
READS = "ptxseg reads PNG, JPEG, TIFF, BMP and DICOM"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from ptxseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        return {Path(r["source"]).name: r for r in csv.DictReader(fh)}


@pytest.fixture
def eps_opened(monkeypatch) -> list[str]:
    """Every image Pillow's EPS plugin is asked to open (it still opens it: Ghostscript then
    runs when the pixels are loaded, as it would without this spy)."""
    from PIL import EpsImagePlugin

    calls: list[str] = []
    original = EpsImagePlugin.EpsImageFile._open

    def spy(self):
        calls.append(repr(self.fp))
        return original(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    return calls


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("decode") / "run"
    make_run(run)
    return run


# ---------------------------------------------------------------------------------------------
# 1. formats: an allow-list by magic bytes, before any decoder


def test_postscript_never_reaches_a_decoder(tmp_path, eps_opened):
    """The issue's EPS (Ghostscript writes a file) as an upload, a file under an image suffix,
    under .eps, without a suffix, and as a DOS EPS: refused by its magic, nothing written,
    Pillow's EPS plugin never asked. Where Ghostscript is installed, the old code wrote the
    marker; where it is not, the spy still shows the plugin was reached."""
    marker = tmp_path / "PWNED"
    body = postscript(marker)
    refusal = f"not a readable image (PostScript is not read; {READS})"
    for name, data in (("upload", body), ("evil.eps", body), ("x.png", dos_eps(body))):
        with pytest.raises(DataError) as exc:
            read_image_bytes(data, name)
        assert str(exc.value) == f"{name}: {refusal}"
        assert not isinstance(exc.value, UnsupportedImage)  # served as 400, like any non-image
    for name in ("evil.png", "evil.jpg", "evil.eps", "evil"):
        path = tmp_path / name
        path.write_bytes(body)
        for read in (read_image, probe_image, read_mask_raw, read_image_header):
            with pytest.raises(DataError) as exc:
                read(path)
            assert str(exc.value) == f"{path}: {refusal}", read
    # a DICOM whose JPEG frame is PostScript: the frame is checked to be JPEG first (and
    # pydicom's Pillow decoder is itself limited to JPEG / JPEG 2000)
    from pydicom.uid import JPEGBaseline8Bit

    with pytest.raises(UnsupportedImage, match="its first frame is not a JPEG codestream"):
        read_image_bytes(encapsulated_dicom(body, JPEGBaseline8Bit, 10, 10), "x.dcm")
    assert not marker.exists()
    assert eps_opened == []


def test_a_postscript_loop_does_not_hold_the_reader(tmp_path):
    """``{ } loop`` would keep Ghostscript (and the thread waiting on it) busy forever: it is
    refused at once, in a child process whose whole group (Ghostscript included) is killed if
    it hangs."""
    (tmp_path / "loop.png").write_bytes(POSTSCRIPT_LOOP)
    code = (
        "import sys, time\n"
        "from ptxseg.data.imageio import read_image, read_image_bytes\n"
        "from ptxseg.errors import DataError\n"
        "t = time.perf_counter()\n"
        "for read in (lambda: read_image_bytes(open(sys.argv[1], 'rb').read()),\n"
        "             lambda: read_image(sys.argv[1])):\n"
        "    try:\n"
        "        read()\n"
        "    except DataError as exc:\n"
        "        print(exc)\n"
        "print(round(time.perf_counter() - t, 2))\n"
    )
    done = run_bounded([sys.executable, "-c", code, str(tmp_path / "loop.png")], 30,
                       "reading a PostScript loop")  # fmt: skip
    lines = done.stdout.strip().splitlines()
    assert lines[:2] == [f"upload: not a readable image (PostScript is not read; {READS})",
                         f"{tmp_path / 'loop.png'}: not a readable image (PostScript is not "
                         f"read; {READS})"], done.stderr[-2000:]  # fmt: skip
    assert float(lines[2]) < 5


def test_only_the_documented_formats_are_decoded(tmp_path):
    """PNG, JPEG, TIFF (LZW) and BMP read as Pillow itself decodes them; GIF, WebP, JPEG 2000,
    ICO, PDF, text: refused by their first bytes (Pillow decoded the first four before)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8))
    for name, kwargs in (("a.png", {}), ("a.jpg", {"quality": 95}),
                         ("a.tif", {"compression": "tiff_lzw"}), ("a.bmp", {})):  # fmt: skip
        gray.save(tmp_path / name, **kwargs)
        with Image.open(tmp_path / name) as im:
            expected = np.asarray(im.convert("L"))
        np.testing.assert_array_equal(read_image(tmp_path / name), expected)
        decoded = read_image_bytes((tmp_path / name).read_bytes(), "upload")
        np.testing.assert_array_equal(decoded.image, expected)
        assert decoded.format == {"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "bmp": "BMP"}[
            name[2:]]  # fmt: skip
    refused = {}
    for fmt, suffix in (("GIF", "gif"), ("WEBP", "webp"), ("JPEG2000", "jp2"), ("ICO", "ico"),
                        ("PDF", "pdf")):  # fmt: skip
        buf = io.BytesIO()
        gray.convert("RGB").save(buf, fmt)
        refused[suffix] = buf.getvalue()
    refused["txt"] = b"hello, not an image"
    for suffix, data in refused.items():
        with pytest.raises(DataError, match=r"^upload: not a readable image \((.+ is not read; "
                           f"{READS}|not PNG, JPEG, TIFF, BMP or DICOM)\\)$"):  # fmt: skip
            read_image_bytes(data, "upload")
        (tmp_path / f"b.{suffix}.png").write_bytes(data)  # a name that says PNG changes nothing
        with pytest.raises(DataError, match="not a readable image"):
            read_image(tmp_path / f"b.{suffix}.png")


def _calls(path: Path) -> list[tuple[int, str, dict[str, str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
            out.append((node.lineno, ast.unparse(node.func), kwargs))
        elif isinstance(node, ast.Attribute) and node.attr == "pixel_array":
            out.append((node.lineno, ".pixel_array", {}))
    return out


def test_no_other_way_from_bytes_to_a_decoder_in_src():
    """Every ``Image.open`` names the formats it may open; OpenCV never decodes a file or a
    buffer; DICOM data sets and their pixels are read in ``data/imageio.py`` only (through its
    checks)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for line, func, kwargs in _calls(path):
            short = func.rsplit(".", 1)[-1]
            why = None
            if short == "open" and "Image" in func and "formats" not in kwargs:
                why = "Image.open without formats="
            elif func.startswith("cv2.") and short.startswith(("imread", "imdecode")):
                why = "OpenCV decodes whatever it recognises"
            elif short in ("dcmread", "read_partial", "pixel_array", ".pixel_array") and (
                rel != "data/imageio.py"
            ):
                why = "DICOM read outside data/imageio.py"
            if why:
                offenders.append(f"{rel}:{line}: {func} ({why})")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------------
# 2. decompression bombs: bounded from the header, before decoding

BOMBS = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, PIL.Image, pydicom, pydicom.pixels, pydicom.encaps
PIL.Image.init()
from ptxseg.data import imageio
from ptxseg.errors import PtxsegError
folder = Path(sys.argv[1])
np.zeros(1 << 20, np.uint8).sum()
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (150 << 20), resource.RLIM_INFINITY))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for path in sorted(folder.iterdir()):
    for how, fn in (("file", lambda: imageio.read_image(path)),
                    ("bytes", lambda: imageio.read_image_bytes(path.read_bytes(), path.name)),
                    ("probe", lambda: imageio.probe_image(path)),
                    ("meta", lambda: imageio.dicom_meta(path))):
        if how == "meta" and path.suffix != ".dcm":
            continue
        t = time.perf_counter()
        try:
            fn()
            outcome = "read"
        except PtxsegError as exc:
            outcome = "refused: " + str(exc)
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        out[f"{path.name} {how}"] = [outcome, time.perf_counter() - t]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": out, "rss_growth_mb": (rss - rss0) / 1024}))
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    """Files of a few KB to 3 MB that decode to 128 MB - 256 MB each."""
    from pydicom.uid import JPEGBaseline8Bit

    folder = tmp_path_factory.mktemp("bombs")
    (folder / "png13000.png").write_bytes(png_bomb(13000))
    (folder / "deflated16000.dcm").write_bytes(deflated_dicom_bomb(16000))
    (folder / "jpeg13000.jpg").write_bytes(jpeg_header(13000, 13000))
    (folder / "tiff13000.tif").write_bytes(tiff_header(13000, 13000))
    (folder / "bmp13000.bmp").write_bytes(bmp_header(13000, 13000))
    (folder / "jpegframe13000.dcm").write_bytes(
        encapsulated_dicom(jpeg_header(13000, 13000), JPEGBaseline8Bit, 1024, 1024))
    (folder / "rle4000.dcm").write_bytes(rle_bomb(4000, 4000, 3 << 20))
    return folder


def test_bombs_are_refused_from_their_headers_in_bounded_memory(bombs):
    """In a process whose address space may grow by 150 MB only: each bomb (13000x13000 PNG of
    164 KB, deflated 16000x16000 DICOM of 250 KB, header-only JPEG/TIFF/BMP, a 1024x1024 DICOM
    whose JPEG frame says 13000x13000, an RLE segment 64 times its frame) is refused within a
    second, from a file, from bytes and by ``probe_image``; reading the deflated DICOM's header
    (``dicom_meta``) inflates nothing past it. Peak RSS grows by less than 50 MB, where one
    decoded bomb is 128 MB to 256 MB."""
    assert (bombs / "png13000.png").stat().st_size < 200_000
    assert (bombs / "deflated16000.dcm").stat().st_size < 300_000
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", BOMBS, str(bombs)],
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = report["results"]
    for case, (outcome, seconds) in results.items():
        name, how = case.split()
        assert seconds < 1.0, (case, outcome, seconds)
        if how == "meta":
            assert outcome == "read", (case, outcome)
            continue
        if how == "probe" and name in ("jpegframe13000.dcm", "rle4000.dcm"):
            assert outcome == "read", (case, outcome)  # the header is fine; its frame is not
            continue
        shown = name if how == "bytes" else str(bombs / name)
        assert outcome.startswith(f"refused: {shown}: "), (case, outcome)
    assert report["rss_growth_mb"] < 50, report
    from ptxseg.data.imageio import DEFAULT_MAX_PIXELS

    limit = f"above the limit of {DEFAULT_MAX_PIXELS} pixels (PTXSEG_MAX_PIXELS)"
    assert results["png13000.png file"][0].endswith(
        f": header claims 13000x13000 pixels, {limit}; refused")
    assert results["deflated16000.dcm bytes"][0] == (
        f"refused: deflated16000.dcm: header claims 16000x16000 pixels, {limit}; refused")
    assert results["jpegframe13000.dcm file"][0].endswith(
        f": its first frame claims 13000x13000 pixels, {limit}; refused")
    assert results["rle4000.dcm file"][0].endswith(
        ": RLE segment 1 decodes to more than the 4000x4000 bytes of its frame; refused")


def test_the_pixel_limit_is_configurable_and_checked(tmp_path, monkeypatch, run_dir):
    """``PTXSEG_MAX_PIXELS`` moves the limit (W x H x samples x frames); a value that is not a
    whole number from 1 to 2^28 is one error line before any work, exit 2."""
    from PIL import Image

    from ptxseg.data.imageio import DEFAULT_MAX_PIXELS, max_pixels

    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert max_pixels() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv("PTXSEG_MAX_PIXELS", "10_000")
    assert read_image(tmp_path / "a.png").shape == (100, 100)
    monkeypatch.setenv("PTXSEG_MAX_PIXELS", "9999")
    with pytest.raises(UnsupportedImage, match="above the limit of 9999 pixels"):
        read_image(tmp_path / "a.png")
    monkeypatch.setenv("PTXSEG_MAX_PIXELS", "299")  # 10 x 10 x 3 samples = 300
    with pytest.raises(UnsupportedImage, match=r"10x10 pixels x 1 frame\(s\) x 3 sample\(s\)"):
        read_image(tmp_path / "rgb.png")
    for bad in ("abc", "0", "-5", "1e9", "inf", str((1 << 28) + 1)):
        monkeypatch.setenv("PTXSEG_MAX_PIXELS", bad)
        rc, _, err = run_cli(["predict", str(run_dir), str(tmp_path / "a.png"),
                              "--out", str(tmp_path / "out"), "--workers", "0"])  # fmt: skip
        assert rc == 2 and err.strip() == (
            f"error: PTXSEG_MAX_PIXELS: {bad!r} is not a whole number of pixels from 1 to "
            f"{1 << 28}"), err  # fmt: skip
        assert not (tmp_path / "out").exists()


def test_real_sample_images_decode_as_pillow_and_pydicom_decode_them(sample_dir):
    """The real SIIM PNGs and JPEG-compressed DICOMs give exactly the pixels of Pillow and
    pydicom used directly (8-bit gray; the DICOMs have no window), from a file and from bytes;
    a deflated copy of a DICOM reads the same pixels."""
    import pydicom
    from PIL import Image

    for path in sorted((sample_dir / "png_images").glob("*.png"))[:12]:
        with Image.open(path) as im:
            expected = np.asarray(im)
        np.testing.assert_array_equal(read_image(path), expected)
        np.testing.assert_array_equal(read_image_bytes(path.read_bytes()).image, expected)
    for path in sorted((sample_dir / "dicom").glob("*.dcm")):
        expected = pydicom.dcmread(path).pixel_array
        np.testing.assert_array_equal(read_image(path), expected)
        np.testing.assert_array_equal(read_image_bytes(path.read_bytes()).image, expected)
    np.testing.assert_array_equal(read_image_bytes(deflated_dicom(expected), "d.dcm").image,
                                  expected)  # fmt: skip
    deep = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300
    stretched = np.rint(deep.astype(float) / deep.max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image_bytes(deflated_dicom(deep), "d.dcm").image,
                                  stretched)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 14. DICOM objects that are not radiographs


def test_dicom_objects_that_are_not_radiographs_are_refused_by_sop_class(tmp_path):
    """SEG, CT (with pixel data) and SR (without) are refused naming their SOP class, from a
    file, from bytes, by probe_image (inspect) and load_pair (evaluate, train); CR, DX and
    Secondary Capture images are read."""
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    for uid, name in ((SEG_SOP_CLASS, "Segmentation Storage"), (CT_SOP_CLASS, "CT Image Storage"),
                      (SR_SOP_CLASS, "Basic Text SR Storage")):  # fmt: skip
        data = dicom_of_class(uid, None if uid == SR_SOP_CLASS else pixels)
        path = tmp_path / f"{uid}.dcm"
        path.write_bytes(data)
        problem = (f"a {name} object (SOP Class {uid}), not a radiograph: ptxseg reads CR, DX "
                   "and Secondary Capture images")  # fmt: skip
        pair = lambda p: load_pair(Record(id="x", image=p))  # noqa: E731
        upload = lambda p: read_image_bytes(p.read_bytes(), "up.dcm")  # noqa: E731
        for read, shown in ((read_image, path), (probe_image, path), (pair, path),
                            (upload, "up.dcm")):  # fmt: skip
            with pytest.raises(UnsupportedImage) as exc:
                read(path)
            assert str(exc.value) == f"{shown}: {problem}"
    for uid in (CR_SOP_CLASS, DX_SOP_CLASS, "1.2.840.10008.5.1.4.1.1.7"):
        np.testing.assert_array_equal(read_image_bytes(dicom_of_class(uid, pixels)).image, pixels)


def test_predict_on_a_folder_of_segs_reports_no_pneumothorax(tmp_path, run_dir, sample_dir):
    """SEGs written by ``ptxseg predict --dicom-seg`` from two real SIIM DICOMs, given back to
    ``ptxseg predict``: every row is a failed row naming the SOP class, exit 2, none with
    pneumothorax."""
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))[:2]
    rc, _, err = run_cli(["predict", str(run_dir), *map(str, dicoms), "--out",
                          str(tmp_path / "first"), "--dicom-seg", "--workers", "0"])  # fmt: skip
    assert rc == 0, err
    # the one warning the SEG writer silences on purpose stays silent while images are read
    # at the same time in another thread (both set the process's warning filters)
    assert "person name" not in err, err
    segs = tmp_path / "first" / "dicom_seg"
    assert len(list(segs.glob("*.dcm"))) == 2
    rc, out, err = run_cli(["predict", str(run_dir), str(segs), "--out", str(tmp_path / "again"),
                            "--workers", "0"])  # fmt: skip
    assert rc == 2, out + err
    assert "0 images predicted" in out and "0 with pneumothorax" in out, out
    rows = rows_of(tmp_path / "again")
    assert len(rows) == 2
    for row in rows.values():
        assert row["status"] == ("error: a Segmentation Storage object (SOP Class "
                                 f"{SEG_SOP_CLASS}), not a radiograph: ptxseg reads CR, DX and "
                                 "Secondary Capture images"), row  # fmt: skip
        assert row["has_pneumothorax"] in ("", "0", "False", "false"), row


# ---------------------------------------------------------------------------------------------
# 19. one DICOM reader, one message


def test_a_cut_dicom_gives_one_message_from_a_file_and_from_bytes(tmp_path, sample_dir):
    """A real JPEG-compressed SIIM DICOM cut inside its pixel data: "truncated" from a file and
    from the same bytes; a header made corrupt (an element whose length runs past the end) is
    "cannot read DICOM header", the same both ways, never "truncated"."""
    source = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    data = source.read_bytes()
    pixel_at = data.index(b"\xe0\x7f\x10\x00OB")
    cuts = {"one fragment in": pixel_at + 40, "half": len(data) // 2, "end": len(data) - 10}
    for what, cut in cuts.items():
        path = tmp_path / f"cut-{cut}.dcm"
        path.write_bytes(data[:cut])
        expected = f"{path}: truncated DICOM: its pixel data is cut short"
        from_bytes = lambda p: read_image_bytes(p.read_bytes(), str(p))  # noqa: E731
        for read in (read_image, read_image_header, from_bytes):
            with pytest.raises(DataError) as exc:
                read(path)
            assert str(exc.value) == expected, what
            assert not isinstance(exc.value, UnsupportedImage)
    # uncompressed and deflated pixel data cut short: the same message
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for name, whole in (("native.dcm", dicom_of_class(CR_SOP_CLASS, pixels.astype(np.uint8))),
                        ("deflated.dcm", deflated_dicom(pixels))):  # fmt: skip
        path = tmp_path / name
        path.write_bytes(whole[: len(whole) - 100])
        for read in (read_image, lambda p: read_image_bytes(p.read_bytes(), str(p))):
            with pytest.raises(DataError) as exc:
                read(path)
            assert str(exc.value) == f"{path}: truncated DICOM: its pixel data is cut short"
    name_at = data.index(b"\x10\x00\x10\x00PN")  # PatientName: length now 0xfffe, past the end
    corrupt = data[: name_at + 6] + b"\xfe\xff" + data[name_at + 8 :]
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(corrupt)
    messages = set()
    for read in (read_image, lambda p: read_image_bytes(p.read_bytes(), str(p))):
        with pytest.raises(DataError) as exc:
            read(path)
        messages.add(str(exc.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith(f"{path}: cannot read DICOM header (") and "truncat" not in message


def test_pydicom_warnings_name_the_file(tmp_path, run_dir, make_dicom):
    """A DICOM whose pixel data holds two frames where its header says one: pydicom's warning
    names the file, in ``ptxseg predict`` and from ``read_image`` (once per file)."""
    import pydicom

    (tmp_path / "in").mkdir()
    path = make_dicom(tmp_path / "in" / "excess.dcm", np.zeros((8, 8), np.uint8))
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes(128)
    ds.save_as(path)
    with pytest.warns(UserWarning) as caught:
        read_image(path)
    texts = [str(w.message) for w in caught]
    assert texts and all(t.startswith(f"{path}: ") for t in texts), texts
    assert len(texts) == len(set(texts))
    rc, _, err = run_cli(["predict", str(run_dir), str(tmp_path / "in"), "--out",
                          str(tmp_path / "out"), "--workers", "0"])  # fmt: skip
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "frames" in ln]
    assert lines and all(ln.startswith(f"warning: {path}: ") for ln in lines), err


def test_named_warnings_keep_each_threads_warnings_apart():
    """Eight threads reading at once, each raising its own warnings: every warning comes out
    once, named by the file of its own thread, and the process's warning filters and hooks are
    as they were (Python's filters are global: unguarded, concurrent recorders swap them)."""
    import threading
    import time
    import warnings

    from ptxseg.data.imageio import named_warnings

    filters, show = list(warnings.filters), warnings.showwarning
    start = threading.Barrier(8)

    def work(i: int) -> None:
        start.wait()
        for k in range(25):
            with named_warnings(f"f{i}.dcm"):
                time.sleep(0.002)  # reading: the other threads run meanwhile
                warnings.warn(f"thread {i} warning {k}", UserWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    texts = sorted(str(w.message) for w in caught)
    assert texts == sorted(f"f{i}.dcm: thread {i} warning {k}" for i in range(8)
                           for k in range(25))  # fmt: skip
    assert list(warnings.filters) == filters and warnings.showwarning is show


# ---------------------------------------------------------------------------------------------
# the whole way: predict on a folder of hostile files


def test_predict_refuses_each_hostile_file_in_its_row(tmp_path, run_dir, bombs, sample_dir,
                                                       eps_opened):  # fmt: skip
    """PostScript (writing a file, looping), bombs and a cut DICOM beside a real radiograph:
    one failed row each naming its problem, the radiograph predicted, exit 2, nothing
    written by Ghostscript, Pillow's EPS plugin never asked."""
    folder = tmp_path / "in"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "evil.png").write_bytes(postscript(marker))
    (folder / "loop.jpg").write_bytes(POSTSCRIPT_LOOP)
    for name in ("png13000.png", "deflated16000.dcm", "rle4000.dcm"):
        shutil.copy(bombs / name, folder / name)
    real = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    (folder / "cut.dcm").write_bytes(real.read_bytes()[:50_000])
    shutil.copy(sorted((sample_dir / "png_images").glob("*.png"))[0], folder / "real.png")
    rc, out, err = run_cli(["predict", str(run_dir), str(folder), "--out", str(tmp_path / "out"),
                            "--workers", "0"])  # fmt: skip
    assert rc == 2, out + err
    rows = rows_of(tmp_path / "out")
    assert rows["real.png"]["status"] == "ok"
    ps = f"error: not a readable image (PostScript is not read; {READS})"
    assert rows["evil.png"]["status"] == rows["loop.jpg"]["status"] == ps
    assert rows["png13000.png"]["status"].startswith("error: header claims 13000x13000 pixels")
    assert rows["deflated16000.dcm"]["status"].startswith("error: header claims 16000x16000")
    assert rows["rle4000.dcm"]["status"].startswith("error: RLE segment 1 decodes to more")
    assert rows["cut.dcm"]["status"] == "error: truncated DICOM: its pixel data is cut short"
    assert "1 images predicted" in out or "1 image predicted" in out, out
    assert not marker.exists() and eps_opened == []
