"""``ptxseg predict`` runs in constant memory: the peak RSS for 200 images is that for 40.

The fast version of ``benchmarks/predict_memory.py`` (200 vs 2,000 images, figures in
docs/benchmarks.md). One fresh process: warm-up prediction, then the kernel's high-water mark
(VmHWM, reset through /proc/self/clear_refs) around a 40-image and a 200-image prediction. The
images are 256 px so that a leak of one array per image is visible: keeping each native-size
probability map (256 KB) adds about 50 MB between the two runs (measured), against 0-3 MB
without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, shutil, sys
from pathlib import Path
from ptxseg.data.synthetic import generate
from ptxseg.postprocess import PostParams
from ptxseg.predict import predict
from tests.conftest import make_run

tmp = Path(sys.argv[1])
make_run(tmp / "run", thresholds=PostParams(binary_threshold=0.5, removal_area=20, size=64))
images = generate(tmp / "data", n=200, size=256, seed=0)
folders = {}
for n in (8, 40, 200):
    folders[n] = tmp / f"in{n}"
    folders[n].mkdir()
    for rec in images[:n]:
        os.link(rec.image, folders[n] / rec.image.name)

def hwm_mb():
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024

def run(n):
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS to the current RSS
    out = tmp / f"out{n}"
    s = predict(tmp / "run", [folders[n]], out, workers=0, batch_size=4, device="cpu",
                progress=False)
    assert s.n_images == n and s.n_errors == 0
    assert len(list((out / "masks").iterdir())) == n
    return hwm_mb()

run(8)  # warm-up: lazy initialisation, thread pools, allocator caches
print(json.dumps({"peak_40": run(40), "peak_200": run(200)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_rss_does_not_grow_with_the_number_of_images(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    growth = peaks["peak_200"] - peaks["peak_40"]
    assert growth < 20, peaks  # MB, for 5x the images
