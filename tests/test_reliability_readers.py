"""Regular files only, everywhere (issue 26, item 8): every file ptxseg reads goes through
``ptxseg.fileio`` (``open_regular`` and the readers built on it), so a FIFO, a device or a
folder where a file should be is one line and exit 2, never a read that blocks forever or
fills the memory.

The scan holds the code to it: no module but ``fileio`` calls a file reader on a path
(``open``, ``Path.read_text``, ``torch.load``, ``Image.open``, ``pydicom.dcmread``...); the
few calls that read a handle or bytes ``fileio`` gave are listed with their reason. The
behaviour tests run the CLI in this process, each in a thread that fails the test if it is
still blocked after ``READ_TIMEOUT`` (the FIFOs are then opened for writing to release it).
"""

from __future__ import annotations

import ast
import os
from collections import Counter
from pathlib import Path

import pytest

from ptxseg.postprocess import PostParams
from tests.conftest import REPO, make_run
from tests.test_predict import SIZE, run_cli
from tests.test_reliability_files import READ_TIMEOUT, _image, _within

SRC = REPO / "src" / "ptxseg"
#: calls that read the file their first argument names
READERS = {
    "open", "io.open", "os.open", "Image.open", "PIL.Image.open", "torch.load", "np.load",
    "numpy.load", "json.load", "pickle.load", "yaml.load", "yaml.safe_load", "yaml.full_load",
    "yaml.unsafe_load", "yaml.load_all", "yaml.safe_load_all", "cv2.imread", "cv2.imreadmulti",
    "pydicom.dcmread", "pydicom.read_file", "dcmread", "load_file", "safe_open", "onnx.load",
    "onnx.load_model", "InferenceSession", "ort.InferenceSession",
    "onnxruntime.InferenceSession", "np.fromfile", "np.memmap", "np.loadtxt", "np.genfromtxt",
    "pd.read_csv", "pd.read_json", "tifffile.imread", "imageio.imread",
}  # fmt: skip
#: methods that read the file of the object they are called on (``Path.read_text``...)
READER_METHODS = {"read_text", "read_bytes", "open"}
#: receivers of such a method that are not files (``Run.open`` opens a folder, reads nothing)
NOT_FILES = {"Run", "fileio"}
#: (module, call) -> how many, each reading what fileio handed over, not a path
ALLOWED = {
    ("checkpoint.py", "torch.load"): 1,  # the handle open_regular gave
    ("weights.py", "torch.load"): 1,  # the handle open_regular gave
    ("data/imageio.py", "Image.open"): 1,  # the handle open_regular gave
    ("data/imageio.py", "dcmread"): 1,  # the handle open_regular gave (read_dicom_object)
    ("onnx_runtime.py", "ort.InferenceSession"): 1,  # bytes read by fileio.read_bytes
    ("export.py", "onnx.load"): 1,  # the export it just wrote into its own temporary folder
}


def _reads(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        receiver = ast.unparse(node.func.value) if method else None
        if name in READERS or (method in READER_METHODS and receiver not in NOT_FILES):
            found.append((node.lineno, name))
    return found


def test_every_file_read_goes_through_fileio():
    found: Counter = Counter()
    where: dict[tuple[str, str], list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module == "fileio.py":
            continue
        for line, name in _reads(ast.parse(path.read_text(encoding="utf-8"))):
            found[(module, name)] += 1
            where.setdefault((module, name), []).append(line)
    unexpected = [f"src/ptxseg/{m}:{where[(m, n)]}: {n}" for (m, n), k in found.items()
                  if ALLOWED.get((m, n), 0) < k]  # fmt: skip
    assert not unexpected, "read these through ptxseg.fileio:\n" + "\n".join(unexpected)
    stale = {key: k for key, k in ALLOWED.items() if found.get(key, 0) != k}
    assert not stale, f"the allowed reads changed; update ALLOWED: {stale}"


def test_the_scan_finds_each_kind_of_read():
    code = (
        "open(p)\nPath(p).read_text()\nself.path.read_bytes()\nx.open()\ntorch.load(p)\n"
        "Image.open(p)\npydicom.dcmread(p)\nyaml.safe_load(s)\nRun.open(p)\nfileio.read_text(p)\n"
        "read_text(p, 'x')\n"
    )
    assert [n for _, n in _reads(ast.parse(code))] == [
        "open", "Path(p).read_text", "self.path.read_bytes", "x.open", "torch.load",
        "Image.open", "pydicom.dcmread", "yaml.safe_load",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ behaviour


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("readers") / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run


def _one_line_refusal(argv: list[str], fifos: list[Path]) -> str:
    """Run the CLI (failing if it blocks); returns its one error line."""
    result = []
    _within(READ_TIMEOUT, lambda: result.append(run_cli(argv)), fifos=fifos)
    rc, out, err = result[0]
    assert rc == 2, (rc, err[-2000:])
    lines = err.splitlines()  # train says what it is doing first ("loading data: ...")
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err[-2000:]
    assert "Traceback" not in err
    return lines[-1].removeprefix("error: ")


def _copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("config.yaml", "best.ckpt", "thresholds.json"):
        os.link(run / name, dest / name)
    return dest


FIFO = "not a regular file (a FIFO)"


def test_a_fifo_as_any_file_is_one_line(run, synth_data, tmp_path):
    """A FIFO as --config, as --model (a checkpoint, an ONNX file), as RUN/best.ckpt, as
    RUN/data.json, as --thresholds and as the encoder weights file: each hung before."""
    image, data = _image(tmp_path / "in" / "a.png"), synth_data

    def fifo(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    predict = ["predict", str(run), str(image), "--out", str(tmp_path / "o")]
    config, ckpt, onnx = fifo(tmp_path / "c.yaml"), fifo(tmp_path / "m.ckpt"), fifo(
        tmp_path / "m.onnx")
    thresholds = fifo(tmp_path / "t.json")
    weights = fifo(tmp_path / "w.pth")
    fifo_best = _copy_run(run, tmp_path / "fifo-best")
    (fifo_best / "best.ckpt").unlink()
    fifo(fifo_best / "best.ckpt")
    fifo_data = _copy_run(run, tmp_path / "fifo-data")
    fifo(fifo_data / "data.json")
    fifo_in_run = f"{fifo_best / 'best.ckpt'}: {FIFO}"
    train = ["train", "--data", str(data), "--config", "demo", "--set",
             "model.encoder=efficientnet-b0"]
    cases = [
        (["config", "show", str(config)], f"{config}: {FIFO}"),
        ([*train, "--out", str(tmp_path / "r"), "--config", str(config)], f"{config}: {FIFO}"),
        ([*predict, "--model", str(ckpt)], f"{ckpt}: {FIFO}"),
        ([*predict, "--model", str(onnx), "--backend", "onnx"], f"{onnx}: {FIFO}"),
        (["predict", str(fifo_best), str(image), "--out", str(tmp_path / "o2")], fifo_in_run),
        (["tune", str(fifo_data), "--overwrite"], f"{fifo_data / 'data.json'}: {FIFO}"),
        ([*predict, "--thresholds", str(thresholds)], f"{thresholds}: {FIFO}"),
        ([*train, "--out", str(tmp_path / "r2"), "--set", f"model.encoder_weights={weights}"],
         f"model.encoder_weights: {weights}: {FIFO}"),
    ]
    fifos = [config, ckpt, onnx, thresholds, weights, fifo_best / "best.ckpt",
             fifo_data / "data.json"]  # fmt: skip
    for argv, message in cases:
        assert _one_line_refusal(argv, fifos) == message, argv


def test_a_device_or_a_folder_as_a_file_is_one_line(run, synth_data, tmp_path):
    """/dev/zero as a config (OOM-killed at 18 GB before), a checkpoint, thresholds; a folder
    as thresholds or weights (said "file not found")."""
    image, data = _image(tmp_path / "in" / "a.png"), synth_data
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    predict = ["predict", str(run), str(image), "--out", str(tmp_path / "o")]
    device = "/dev/zero: not a regular file (a device)"
    cases = [
        (["config", "show", "/dev/zero"], device),
        ([*predict, "--model", "/dev/zero"], device),
        ([*predict, "--thresholds", "/dev/zero"], device),
        ([*predict, "--thresholds", str(folder)], f"{folder}: not a regular file (a folder)"),
        (["train", "--data", str(data), "--out", str(tmp_path / "r"), "--config", "demo",
          "--set", "model.encoder=efficientnet-b0", "--set", f"model.encoder_weights={folder}"],
         f"model.encoder_weights: {folder}: not a regular file (a folder)"),
    ]
    for argv, message in cases:
        assert _one_line_refusal(argv, []) == message, argv


def test_a_huge_file_is_refused_from_its_size(tmp_path):
    """A (sparse) 1 GiB config or thresholds file: refused before a byte is read."""
    from ptxseg.config import load_config
    from ptxseg.errors import ConfigError, DataError
    from ptxseg.postprocess import load_params

    for name in ("c.yaml", "t.json"):
        with open(tmp_path / name, "wb") as fh:
            fh.truncate(1 << 30)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert str(info.value) == (
        f"{tmp_path / 'c.yaml'}: too large for a config (1 GiB; the limit is 256 KiB)"
    )
    with pytest.raises(DataError) as info:
        load_params(tmp_path / "t.json")
    assert str(info.value) == (
        f"{tmp_path / 't.json'}: too large for a thresholds file (1 GiB; the limit is 64 MiB)"
    )
