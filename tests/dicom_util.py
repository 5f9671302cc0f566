"""Helpers of the DICOM conformance tests: dicom3tools' ``dciodvfy`` (an independent validator
of DICOM objects against the IODs of PS3.3 and the VRs of PS3.5) and the warnings it still
gives on ptxseg's SEGs, each explained in docs/clinical-outputs.md.

``dciodvfy`` comes from Debian's ``dicom3tools`` package: tests that need it skip where it is
absent, except in CI (``PTXSEG_REQUIRE_DCIODVFY=1``, set by ``.ci/run``, which installs it),
where its absence is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "clinical-outputs.md"

#: the dciodvfy warnings a SEG of a SIIM-ACR DICOM still gets, by a phrase of each; each is in
#: the table of docs/clinical-outputs.md with its reason
KNOWN_WARNINGS = (
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
    "Retired Person Name form",
)


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """The path of ``dciodvfy``; skips where it is absent, fails in CI."""
    path = shutil.which("dciodvfy")
    if path is None:
        msg = "dciodvfy (Debian's dicom3tools) not found"
        if os.environ.get("PTXSEG_REQUIRE_DCIODVFY") == "1":
            pytest.fail(msg + " (PTXSEG_REQUIRE_DCIODVFY=1)")
        pytest.skip(msg)
    return path


def validate(dciodvfy: str, path: Path) -> tuple[list[str], list[str]]:
    """``(error lines, warning lines)`` of ``dciodvfy`` on ``path``."""
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60,
                          errors="replace", check=False)  # fmt: skip
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def unexplained(warnings: list[str]) -> list[str]:
    """The warnings that are none of :data:`KNOWN_WARNINGS`."""
    return [w for w in warnings if not any(k in w for k in KNOWN_WARNINGS)]
