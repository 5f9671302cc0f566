"""Every file the project writes goes through :mod:`ptxseg.fileio` (temp file + rename).

Two checks: a scan of ``src/`` for direct writes (any write API whose target is not a handle
from ``atomic_open`` or an in-memory buffer), and a behavioural test that SIGKILLs processes
writing big files through fileio at random moments.
"""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import reap, sigkill

SRC = Path(__file__).resolve().parents[1] / "src" / "ptxseg"

#: calls that write to the file system when given a path (module or method name)
WRITE_CALLS = {
    "write_text", "write_bytes", "imwrite", "savefig", "save", "savez", "savez_compressed",
    "savetxt", "tofile", "dump", "to_csv", "to_json", "save_as", "save_checkpoint", "export",
    "copy", "copy2", "copyfile", "copytree", "move", "rename", "replace", "symlink_to",
    "hardlink_to", "link_to", "touch",
}  # fmt: skip
#: call roots that mean "this is not a file write" (str.replace, dataclasses.replace...)
NOT_FILE_WRITES = {"dataclasses", "str", "re"}
#: names that write files only as shutil functions
SHUTIL_ONLY = {"copy", "copy2", "copyfile", "copytree", "move"}

#: direct writes that are legitimate, with the reason: (file, call text) -> reason
ALLOWED = {
    ("data/prepare.py", "os.replace(tmp, out)"): (
        "whole-folder atomicity: the copy is built in a hidden sibling folder whose files are "
        "each written with fileio, then renamed into place in one step"
    ),
    ("cv.py", "os.replace(tmp, path)"): (
        "cv.json is written whole with fileio.write_json to a hidden temp file, then linked (or, "
        "without hard links, renamed) into place so that one of several creators wins"
    ),
    ("export.py", "torch.onnx.export(wrapper, (sample,), str(path), dynamo=False, "
     "opset_version=opset, dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}}, "
     "**kwargs)"): (
        "writes into a TemporaryDirectory; the bytes reach the output with fileio.write_bytes"
    ),
    ("export.py", "torch.onnx.export(wrapper, (sample,), str(path), dynamo=True, "
     "opset_version=max(opset, 18), dynamic_shapes={'x': {0: batch}}, external_data=False, "
     "**kwargs)"): (
        "writes into a TemporaryDirectory; the bytes reach the output with fileio.write_bytes"
    ),
}  # fmt: skip


def _bound_handles(func: ast.AST) -> set[str]:
    """Names bound to a safe write target in a scope: ``with atomic_open(...) as fh``, and
    in-memory buffers (``io.BytesIO()``/``io.StringIO()``)."""
    names: set[str] = set()
    for node in ast.walk(func):
        if isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name):
            call = node.context_expr
            if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("atomic_open"):
                names.add(node.optional_vars.id)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if ast.unparse(node.value.func) in ("io.BytesIO", "io.StringIO", "BytesIO", "StringIO"):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _open_mode(call: ast.Call) -> str:
    """The mode of ``open(path, mode)`` / ``Path.open(mode)`` ("?" when not a literal)."""
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    method = isinstance(call.func, ast.Attribute) and ast.unparse(call.func) != "io.open"
    if mode is None and method:  # path.open("w"); Image.open(path) opens for reading
        first = call.args[0] if call.args else None
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        mode = first if literal else None
    elif mode is None and len(call.args) > 1:
        mode = call.args[1]
    if mode is None:
        return "r"
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "?"


def _write_call(node: ast.Call, safe: set[str]) -> bool:
    """Whether a call writes a file directly (not through fileio / a safe handle)."""
    func = ast.unparse(node.func)
    short = func.rsplit(".", 1)[-1]
    root = func.split(".")[0]
    if short == "open" or func in ("os.open", "io.open"):
        if func == "os.open":
            return "O_WRONLY" in ast.unparse(node) or "O_RDWR" in ast.unparse(node)
        return any(c in _open_mode(node) for c in "wax+?")
    if short not in WRITE_CALLS or root in NOT_FILE_WRITES:
        return False
    if "." not in func and short in ("write_text", "write_bytes"):
        return False  # fileio's own functions, imported by name
    if func.startswith(("fileio.", "ptxseg.fileio.")):
        return False
    if short in SHUTIL_ONLY and root != "shutil":
        return False  # arr.copy(), dict.copy(): not files
    if short in ("rename", "replace") and root not in ("os", "shutil"):
        value = node.func.value if isinstance(node.func, ast.Attribute) else None
        pathlike = value is not None and "path" in ast.unparse(value).lower()
        if not (pathlike and len(node.args) == 1 and not node.keywords):
            return False  # str.replace / dataclasses.replace, not Path.replace
    targets = [ast.unparse(a) for a in node.args] + [ast.unparse(k.value) for k in node.keywords]
    return not any(t in safe for t in targets)  # torch.save(obj, fh) into a safe handle


def direct_writes(root: Path = SRC) -> list[str]:
    """``file:line: call`` for each write outside fileio.py that is not atomic or allowed."""
    offenders: set[str] = set()

    def visit(node: ast.AST, safe: set[str], rel: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            safe = safe | _bound_handles(node)  # closures see the enclosing handles
        if isinstance(node, ast.Call) and _write_call(node, safe):
            text = ast.unparse(node)
            if (rel, text) not in ALLOWED:
                offenders.add(f"{rel}:{node.lineno}: {text}")
        for child in ast.iter_child_nodes(node):
            visit(child, safe, rel)

    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel != "fileio.py":
            visit(ast.parse(path.read_text(encoding="utf-8")), set(), rel)
    return sorted(offenders, key=lambda o: (o.split(":")[0], int(o.split(":")[1])))


def test_no_direct_writes_outside_fileio():
    offenders = direct_writes()
    assert not offenders, (
        "direct file writes outside ptxseg.fileio (use atomic_open/write_* or add to ALLOWED "
        "with a reason):\n" + "\n".join(offenders)
    )


def test_the_scan_finds_direct_writes(tmp_path):
    """The scanner is not vacuous: each kind of direct write in a module is reported, the
    atomic forms are not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "import cv2, torch, numpy as np, json, io, os, shutil\n"
        "from pathlib import Path\n"
        "from ptxseg.fileio import atomic_open, write_text\n"
        "def bad(path, obj, fig, arr):\n"
        "    open(path, 'w').write('x')\n"
        "    with open(path, mode='wb') as fh:\n"
        "        fh.write(b'')\n"
        "    Path(path).write_text('x')\n"
        "    path.write_bytes(b'')\n"
        "    cv2.imwrite(str(path), arr)\n"
        "    fig.savefig(path)\n"
        "    torch.save(obj, path)\n"
        "    np.save(path, arr)\n"
        "    arr.tofile(path)\n"
        "    json.dump(obj, open(path, 'a'))\n"
        "    shutil.copy(path, path)\n"
        "    os.replace(path, path)\n"
        "    path.open('w')\n"
        "def good(path, obj, fig, text):\n"
        "    with atomic_open(path, 'wb') as fh:\n"
        "        torch.save(obj, fh)\n"
        "    buf = io.BytesIO()\n"
        "    fig.savefig(buf, format='png')\n"
        "    write_text(path, 'x')\n"
        "    open(path).read()\n"
        "    path.open('rb')\n"
        "    text.replace('a', 'b')\n"
    )
    found = direct_writes(pkg)
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == [5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 15, 16, 17, 18], found  # 15: dump + open


# ---------------------------------------------------------------------------------------------
# a real kill in the middle of writes

WRITER = r"""
import json, os, sys
from ptxseg import fileio
path, kind = sys.argv[1], sys.argv[2]
n = 0
while True:
    n += 1
    tag = "AB"[n % 2]
    if kind == "bytes":
        fileio.write_bytes(path, tag.encode() * (4 << 20))
    else:
        fileio.write_json(path, {"tag": tag, "rows": [[tag] * 64] * 4000})
    if n == 2:
        os.write(1, b"ready\n")
"""


def _complete_contents(kind: str) -> set[bytes]:
    if kind == "bytes":
        return {t.encode() * (4 << 20) for t in "AB"}
    return {
        (json.dumps({"tag": t, "rows": [[t] * 64] * 4000}, indent=2) + "\n").encode()
        for t in "AB"
    }


@pytest.mark.parametrize("kind", ["bytes", "json"])
def test_sigkill_during_writes_leaves_the_old_or_the_new_file(tmp_path, kind):
    from ptxseg.data.inputs import scan_folder

    target = tmp_path / ("out.bin" if kind == "bytes" else "metrics.json")
    complete = _complete_contents(kind)
    rng = random.Random(7)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), kind], stdout=subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.15))
            sigkill(proc, timeout=10)
        finally:
            reap(proc)
            proc.stdout.close()
        assert target.read_bytes() in complete  # never half of one
    # a kill mid-write leaves at most hidden ".NAME.*.tmp" files, which no reader takes
    stray = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(n.startswith(f".{target.name}.") and n.endswith(".tmp") for n in stray), stray
    images, skipped = scan_folder(tmp_path)
    assert images == [] and [p.name for p in skipped] == [target.name]


def test_stray_temp_files_are_not_taken_for_data(tmp_path):
    """What a kill mid-write leaves (``.NAME.XXXXXXXX.tmp``) in a dataset or an input folder is
    neither a record nor an image to predict."""
    from ptxseg.data.inputs import collect_inputs
    from ptxseg.data.sources import load_records
    from ptxseg.data.synthetic import generate

    data = tmp_path / "data"
    generate(data, n=4, size=32, seed=0)
    for sub in ("png_images", "png_masks"):
        first = sorted((data / sub).iterdir())[0]
        (data / sub / f".{first.name}.k2j4x9q1.tmp").write_bytes(first.read_bytes()[:100])
    records, layout = load_records(data)
    assert layout == "png" and len(records) == 4
    inputs = collect_inputs([data / "png_images"])
    assert [e.path.name for e in inputs.entries] == sorted(
        p.name for p in (data / "png_images").iterdir() if not p.name.startswith(".")
    )
