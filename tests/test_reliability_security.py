"""Hostile run folders and datasets: checkpoints that would run code, names from data that
carry markup, paths, shell syntax or terminal escapes, and manifest paths.

Nothing here may execute, expand or escape: a crafted checkpoint is refused before any code in
it runs (exit 2, one line), outputs stay inside ``--out`` whatever the ids, names are shown as
text, and manifest cells are file names, never shell words.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ptxseg.cli import main
from ptxseg.data.sources import load_records
from ptxseg.errors import DataError
from ptxseg.postprocess import PostParams
from tests.conftest import make_run

SRC = Path(__file__).resolve().parents[1] / "src" / "ptxseg"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# checkpoints that would execute code


class RunsShell:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch-zip":  # a real torch.save archive with the object inside
        torch.save({"state_dict": {"model.w": torch.zeros(1)}, "x": RunsShell(marker)}, path)
    else:  # a bare pickle stream
        path.write_bytes(pickle.dumps({"state_dict": RunsShell(marker)}, protocol=2))


@pytest.fixture
def evil_run(tmp_path):
    """A complete run folder (config, split, data.json, thresholds) whose checkpoints would
    run ``touch MARKER`` when unpickled without ``weights_only``; plus a dataset."""
    from ptxseg.data.split import make_split, write_split
    from ptxseg.data.synthetic import generate
    from ptxseg.fileio import write_json

    data = tmp_path / "data"
    records = generate(data, n=6, size=64, seed=1)
    run = tmp_path / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=64))
    write_split(run / "split.csv", records, make_split(records, 0.34, seed=0))
    write_json(run / "data.json", {"root": str(data), "layout": "png"})
    return run, data, tmp_path / "MARKER"


@pytest.mark.parametrize("kind", ["torch-zip", "pickle"])
@pytest.mark.parametrize("command", ["predict", "evaluate", "tune", "export", "train-resume"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(evil_run, command, kind):
    run, data, marker = evil_run
    which = "last.ckpt" if command == "train-resume" else "best.ckpt"
    _evil_checkpoint(run / which, marker, kind)
    out = run.parent / "out"
    argv = {
        "predict": ["predict", str(run), str(data / "png_images"), "--out", str(out)],
        "evaluate": ["evaluate", str(run), "--data", str(data), "--out", str(out)],
        "tune": ["tune", str(run), "--overwrite"],  # its thresholds.json is hand-written
        "export": ["export", str(run), "--out", str(out / "m.onnx")],
        "train-resume": ["train", "--data", str(data), "--out", str(run), "--resume"],
    }[command]
    rc, _, err = run_cli(argv)
    line = one_error_line(err)
    assert rc == 2
    assert f"{run / which}: refusing to load" in line and "weights_only=True" in line, line
    assert not marker.exists()  # the payload never ran
    assert not out.exists()  # and nothing was written


def test_the_crafted_checkpoint_does_run_code_without_weights_only(tmp_path):
    """The payload is real: a plain ``torch.load`` would have executed it."""
    marker = tmp_path / "MARKER"
    _evil_checkpoint(tmp_path / "x.ckpt", marker, "torch-zip")
    torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# names and ids from data

HOSTILE_NAMES = [  # file names (a "/" cannot be in one: "<script>...</script>" is an id below)
    "<img src=x onerror=alert(1)>",
    "$(touch MARKER)",
    "`touch MARKER`",
    "a;touch MARKER",
    "-rf",
    "~",
    "$HOME",
    "x" * 240,
    "évian \u202ecod.exe",
]


def test_predict_keeps_every_output_inside_out_whatever_the_names(tmp_path):
    """Input files named with markup, shell syntax, ``..``, very long names; and a manifest
    dataset whose ids try to climb out of --out. Every output lands in --out/masks|overlays,
    named by a file-safe id; the sources are recorded verbatim; no shell ran."""
    run = tmp_path / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=64))
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (48, 40), dtype=np.uint8)
    for name in HOSTILE_NAMES:
        cv2.imwrite(str(inputs / f"{name}.png"), img)
    manifest_dir = tmp_path / "manifest"
    manifest_dir.mkdir()
    cv2.imwrite(str(manifest_dir / "a.png"), img)
    cv2.imwrite(str(manifest_dir / "b.png"), img)
    cv2.imwrite(str(manifest_dir / "c.png"), img)
    (manifest_dir / "list.csv").write_text(
        "image,mask,id\na.png,,../../escaped\nb.png,,/tmp/abs\nc.png,,<script>alert(1)</script>\n",
        encoding="utf-8",
    )
    out = tmp_path / "work" / "out"
    before = {p for p in tmp_path.rglob("*")}
    rc, _, err = run_cli(["predict", str(run), str(inputs), str(manifest_dir), "--out", str(out)])
    assert rc == 0, err

    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if p not in out.parents and p != out and out not in p.parents]
    assert outside == []
    assert not (tmp_path / "MARKER").exists() and not Path("MARKER").exists()
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(HOSTILE_NAMES) + 3
    sources = {r["source"] for r in rows}
    assert {str(inputs / f"{n}.png") for n in HOSTILE_NAMES} <= sources
    for r in rows:
        assert r["status"] == "ok", r
        ident = r["id"]
        assert "/" not in ident and "\\" not in ident and not ident.startswith(".")
        assert (out / "masks" / f"{ident}.png").is_file()
        assert (out / "overlays" / f"{ident}.png").is_file()
    assert not list(out.rglob(".*"))  # no temp file left behind
    assert sorted(p.name for p in out.iterdir()) == [
        "masks", "overlays", "predict.json", "results.csv"
    ]  # fmt: skip


def test_fileio_writes_names_close_to_the_file_system_limit(tmp_path):
    """Names of 250 bytes (255 is the usual limit): the hidden temp file beside them must not
    be longer than the file system allows."""
    from ptxseg.fileio import write_bytes

    for name in ("y" * 246 + ".png", "肺" * 80 + ".png"):  # 250 and 244 bytes
        path = tmp_path / name
        write_bytes(path, b"ok")
        assert path.read_bytes() == b"ok"
    assert sorted(os.listdir(tmp_path)) == sorted(["y" * 246 + ".png", "肺" * 80 + ".png"])


def test_error_lines_quote_data_as_text_on_one_line(tmp_path):
    """A CSV header carrying a newline and terminal escape codes: the error is one line, the
    escape codes are shown as ``\\x1b``, never sent to the terminal."""
    data = tmp_path / "d.csv"
    data.write_text('"image\x1b[2J\x1b]0;pwned\x07","a\nb"\nx.png,y\n', encoding="utf-8")
    rc, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "r")])
    # stderr is no terminal here: train logs its stage first ("loading data: ...")
    line = one_error_line("\n".join(x for x in err.splitlines() if not x.startswith("loading ")))
    assert rc == 2 and "\x1b" not in err and "\x07" not in err
    assert "expected columns image,mask" in line and "\\x1b]0;pwned" in line and "a\\nb" in line


# ---------------------------------------------------------------------------------------------
# CSV manifest paths: resolved as documented, never expanded


def _manifest(root: Path, rows: list[tuple[str, str]]) -> Path:
    text = "image,mask,id\n" + "".join(f"{i},{m},r{k}\n" for k, (i, m) in enumerate(rows))
    path = root / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _pair(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = np.full((32, 32), 90, np.uint8)
    cv2.imwrite(str(folder / f"{name}.png"), img)
    cv2.imwrite(str(folder / f"{name}_mask.png"), img * 0)


def test_manifest_paths_relative_dotdot_and_absolute_resolve_as_documented(tmp_path):
    root = tmp_path / "root"
    _pair(root / "imgs", "in")
    _pair(tmp_path / "elsewhere", "up")
    _pair(tmp_path / "abs", "abs")
    manifest = _manifest(root, [
        ("imgs/in.png", "imgs/in_mask.png"),
        ("../elsewhere/up.png", "../elsewhere/up_mask.png"),
        (str(tmp_path / "abs" / "abs.png"), str(tmp_path / "abs" / "abs_mask.png")),
    ])  # fmt: skip
    records, layout = load_records(manifest)
    assert layout == "csv"
    assert [r.image for r in records] == [
        root / "imgs/in.png", root / "../elsewhere/up.png", tmp_path / "abs/abs.png"
    ]  # fmt: skip
    assert all(r.image.is_file() and r.mask.is_file() for r in records)


@pytest.mark.parametrize("cell", ["~/x.png", "$HOME/x.png", "${HOME}/x.png", "%USERPROFILE%/x.png",
                                  "*.png", "$(touch MARKER).png", "`touch MARKER`.png"])
def test_manifest_cells_are_never_expanded_or_executed(tmp_path, monkeypatch, cell):
    home = tmp_path / "home"
    _pair(home, "x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    _pair(root, "a")
    manifest = _manifest(root, [("a.png", "a_mask.png"), (cell, "")])
    with pytest.raises(DataError) as err:
        load_records(manifest)  # the literal name does not exist: not found, not expanded
    assert str(err.value).startswith(f"{root / cell}: image not found (line 3 of {manifest})")
    assert not (tmp_path / "MARKER").exists() and not (root / "MARKER").exists()
    # the same cell naming a file that literally has that name is used as written
    literal = root / cell
    literal.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "a.png", literal)
    records, _ = load_records(manifest)
    assert records[1].image == literal and records[1].mask is None


# ---------------------------------------------------------------------------------------------
# nothing in src runs a shell, expands user paths, or unpickles without weights_only

FORBIDDEN = {
    "os.system": "runs a shell",
    "os.popen": "runs a shell",
    "os.path.expanduser": "expands ~ in a path",
    "os.path.expandvars": "expands $VAR in a path",
    "expanduser": "expands ~ in a path (Path.expanduser)",
    "eval": "evaluates text as code",
    "exec": "executes text as code",
    "pickle.load": "unpickles arbitrary objects",
    "pickle.loads": "unpickles arbitrary objects",
    "yaml.load": "yaml.load can build objects; use yaml.safe_load",
    "yaml.unsafe_load": "builds arbitrary objects",
}


def security_offenders(root: Path = SRC) -> list[str]:
    """``file:line: call (why)`` for shell use, path expansion, code evaluation and unsafe
    deserialisation in the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            short = func.rsplit(".", 1)[-1]
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            why = FORBIDDEN.get(func) or (FORBIDDEN.get(short) if short == "expanduser" else None)
            if kwargs.get("shell") not in (None, "False"):
                why = "shell=True"
            if func in ("torch.load", "load") and "torch" in func and kwargs.get(
                "weights_only"
            ) != "True":
                why = "torch.load without weights_only=True"
            if func.endswith("np.load") and kwargs.get("allow_pickle") == "True":
                why = "np.load(allow_pickle=True)"
            if why:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} ({why})")
    return found


def test_no_shell_no_path_expansion_no_unsafe_loading_in_src():
    offenders = security_offenders()
    assert not offenders, "\n".join(offenders)


def test_the_security_scan_finds_each_pattern(tmp_path):
    (tmp_path / "m.py").write_text(
        "import os, pickle, subprocess, torch, yaml, numpy as np\n"
        "from pathlib import Path\n"
        "def f(p, s):\n"
        "    os.system(s)\n"
        "    subprocess.run(s, shell=True)\n"
        "    Path(p).expanduser()\n"
        "    os.path.expandvars(p)\n"
        "    torch.load(p)\n"
        "    torch.load(p, weights_only=False)\n"
        "    pickle.load(open(p, 'rb'))\n"
        "    yaml.load(s)\n"
        "    np.load(p, allow_pickle=True)\n"
        "    eval(s)\n"
        "    subprocess.run(['ls', p])\n"
        "    torch.load(p, weights_only=True)\n"
        "    yaml.safe_load(s)\n"
    )
    assert [int(o.split(":")[1]) for o in security_offenders(tmp_path)] == list(range(4, 14))


def test_inspect_and_predict_print_hostile_file_names_escaped(tmp_path, capsys):
    """A file name with a newline and a terminal escape is printed as ``\\n`` / ``\\x1b``."""
    from ptxseg.cli import main

    root = tmp_path / "data"
    (root / "png_images").mkdir(parents=True)
    (root / "png_masks").mkdir()
    hostile = "evil\n\x1b[2Jname.png"
    (root / "png_images" / hostile).write_bytes(b"not a png")
    assert main(["inspect", str(root)]) == 2
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out and "\\x1b[2J" in out.replace("\n", "")

    from tests.conftest import make_run

    make_run(tmp_path / "run")
    assert main(["predict", str(tmp_path / "run"), str(root / "png_images"),
                 "--out", str(tmp_path / "pred"), "--workers", "0"]) == 2
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert "\x1b[2J" not in both and "evil\\n\\x1b[2Jname.png" in both.replace("\n", "")
