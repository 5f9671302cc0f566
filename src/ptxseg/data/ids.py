"""Record ids as file names: the one rule that makes an id safe to name a file with
(:func:`safe_id`, used by ``ptxseg predict`` for ``masks/<id>.png`` and by ``ptxseg prepare``
for its copy's file names), and the ids a manifest may not give (:func:`is_path_like`).

A safe id works as a file name on Linux, macOS and Windows: path separators, ``:*?"<>|``,
control characters and DEL become ``_``; a byte of the name that is not UTF-8 becomes ``_xff``
(:func:`ptxseg.errors.printable`, then ``\\`` -> ``_``); a leading dot (a hidden file) gets a
``_`` in front, trailing dots and spaces (which Windows drops) become ``_``, and Windows device
names (``CON``, ``nul.tar``...) get a ``_`` after the name; an id longer than
:data:`MAX_ID_BYTES` is cut and ends with a hash of the whole name. Every real SIIM name
(``0_train_0_``, SOPInstanceUIDs) and PTX-498 id is its own safe id.
"""

from __future__ import annotations

import hashlib
import re

from ptxseg.errors import printable

MAX_ID_BYTES = 200  # ids name files (<id>.png, temp names): stay below the 255-byte limit
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
             *(f"LPT{i}" for i in range(1, 10))}  # fmt: skip


def safe_id(name: str) -> str:
    """``name`` as a portable file stem (see the module doc); a safe name is returned as is."""
    out = _UNSAFE.sub("_", printable(name)).strip()
    if not out or out.startswith("."):
        out = "_" + out
    stripped = out.rstrip(". ")
    if stripped != out:
        out = stripped + "_" * (len(out) - len(stripped))
    base, dot, rest = out.partition(".")
    if base.upper() in _RESERVED:  # Windows reserves NUL and NUL.anything
        out = f"{base}_{dot}{rest}"
    if len(out.encode()) > MAX_ID_BYTES:
        digest = hashlib.sha1(out.encode()).hexdigest()[:10]
        head = out.encode()[: MAX_ID_BYTES - 12].decode(errors="ignore")
        out = f"{head}~{digest}"
    return out


def is_path_like(ident: str) -> bool:
    """Whether a manifest's id would read as a path (a separator, ``.`` or ``..``): refused,
    since an id must name one image, not a place."""
    return "/" in ident or "\\" in ident or ident in (".", "..")
