"""``ptxseg dicom-node`` loses and repeats nothing: a destination down for the first 30 s, a
``kill -9`` in the middle of a batch, and the spool's recovery from each state a kill can
leave (12 real SIIM-ACR DICOMs, a real Orthanc as the destination).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import sigkill
from tests.dicomnode_util import (
    NODE_AET,
    ORTHANC_AET,
    NodeProcess,
    Orthanc,
    free_port,
    need,
    node_run,
    storescu,
    wait_for,
)

pytest.importorskip("pynetdicom", reason="ptxseg dicom-node needs the dicom-node extra")

DOWN_S = 30.0


def _node_args(run: Path, spool: Path, port: int, *extra: str) -> list[str]:
    return [str(run), "--spool", str(spool), "--ae-title", NODE_AET, "--send-to",
            f"{ORTHANC_AET}@127.0.0.1:{port}", "--device", "cpu", "--retry-max-s", "4",
            *extra]  # fmt: skip


def _one_result_each(orthanc: Orthanc, files: list[Path], *, sc: bool = False) -> None:
    """Orthanc holds exactly one SEG and one SR (and one SC) per source file, nothing else."""
    stored = orthanc.by_modality()
    kinds = [("OT", 12)] if sc else []
    assert sorted((k, len(v)) for k, v in stored.items()) == [*kinds, ("SEG", 12), ("SR", 12)]
    sources = sorted(f.stem for f in files)
    seg_sources = sorted(str(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                             .ReferencedSOPInstanceUID) for ds in stored["SEG"])  # fmt: skip
    assert seg_sources == sources
    segs = {str(ds.SOPInstanceUID) for ds in stored["SEG"]}
    for sr in stored["SR"]:
        evidence = {str(i.ReferencedSOPInstanceUID)
                    for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        assert len(evidence & segs) == 1 and len(evidence & set(sources)) == 1
    if sc:
        assert sorted(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                      for ds in stored["OT"]) == sources  # fmt: skip
    assert len({str(ds.SOPInstanceUID) for v in stored.values() for ds in v}) == 36 if sc else 24


@pytest.fixture
def setup(tmp_path, sample_dir):
    tools = need("Orthanc", "storescu")
    files = sorted((sample_dir / "dicom").glob("*.dcm"))
    assert len(files) == 12
    return tools, files, node_run(tmp_path)


def test_a_destination_down_for_30_s_gets_everything_once_it_is_up(setup, tmp_path):
    tools, files, run = setup
    port = free_port()  # nothing listens there for the first 30 s
    spool = tmp_path / "spool"
    node = NodeProcess(_node_args(run, spool, port), cwd=tmp_path)
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=port)
    try:
        t0 = time.monotonic()
        sent = storescu(tools["storescu"], node.port, files)
        assert sent.returncode == 0, sent.stderr  # acknowledged: spooled, destination or not
        wait_for(lambda: len(list((spool / "results").glob("*/result.json"))) == 12, 60,
                 "12 results written while the destination is down")  # fmt: skip
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - t0)))
        retries = [ln for ln in node.lines if "waiting in the spool" in ln]
        assert len(retries) >= 3, node.text()  # retried and logged, with back-off...
        assert len(retries) <= 30 / 1 + 1  # ...never more often than once a second
        assert not node.delivered()
        orthanc.start()
        wait_for(lambda: len(node.delivered()) == 12, 60, "12 images delivered", interval=0.5)
        time.sleep(1.0)  # anything sent twice would have arrived by now
        _one_result_each(orthanc, files)
        assert len(list((spool / "done").glob("*.json"))) == 12
        assert not list((spool / "results").iterdir())
        assert not list((spool / "received").iterdir())
    finally:
        node.stop()
        orthanc.stop()


def test_kill_9_mid_batch_then_restart_gives_each_image_exactly_one_result(setup, tmp_path):
    tools, files, run = setup
    spool = tmp_path / "spool"
    with Orthanc(tmp_path / "orthanc") as orthanc:
        args = _node_args(run, spool, orthanc.dicom_port, "--max-batch", "2",
                          "--secondary-capture")  # fmt: skip
        node = NodeProcess(args, cwd=tmp_path)
        try:
            sent = storescu(tools["storescu"], node.port, files)
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: orthanc.count() >= 1, 60, "the first result", interval=0.02)
            sigkill(node.proc)
        finally:
            node.stop()
        at_kill = orthanc.count()
        assert 1 <= at_kill < 36, "the kill did not land mid-batch"
        node = NodeProcess(args, cwd=tmp_path)  # the same spool
        try:
            wait_for(lambda: len(list((spool / "done").glob("*.json"))) == 12, 90,
                     "the 12 images answered after the restart", interval=0.5)  # fmt: skip
            time.sleep(1.0)
        finally:
            node.stop()
        _one_result_each(orthanc, files, sc=True)
    assert not list((spool / "results").iterdir())
    assert not list((spool / "received").iterdir())


# -- the spool's recovery, state by state (no network) --------------------------------------


def test_spool_recovery_from_every_state_a_kill_can_leave(tmp_path):
    from ptxseg.dicomnode.spool import Spool

    spool = Spool(tmp_path / "spool")
    assert spool.recover().to_segment == []
    # A: received, not segmented
    assert spool.receive("1.1", b"a")
    # B: received, its results half written (no result.json): segmented again
    assert spool.receive("1.2", b"b")
    (spool.results_dir("1.2")).mkdir(parents=True)
    (spool.results_dir("1.2") / "seg.dcm").write_bytes(b"partial")
    # C: results complete, the received file not yet removed: sent, not segmented again
    assert spool.receive("1.3", b"c")
    spool.write_results("1.3", {"seg": b"s", "sr": b"r"}, {"received_at": 1.0})
    spool.received_path("1.3").write_bytes(b"c")
    # D: SEG acknowledged, SR not: the SR is sent, the SEG not again
    assert spool.receive("1.4", b"d")
    spool.write_results("1.4", {"seg": b"s", "sr": b"r"}, {"received_at": 2.0})
    spool.mark_sent("1.4", "seg")
    # E: delivered, its results not yet removed: nothing to do
    assert spool.receive("1.5", b"e")
    spool.write_results("1.5", {"seg": b"s", "sr": b"r"}, {"received_at": 3.0})
    spool.finish("1.5", {"sop_instance_uid": "1.5"})
    (spool.results_dir("1.5") / "seg.dcm").parent.mkdir(parents=True)
    (spool.results_dir("1.5") / "seg.dcm").write_bytes(b"left")
    # F: a temporary file whose rename never happened
    (spool.root / "received" / ".1.6.dcm.x.tmp").write_bytes(b"half")
    os.utime(spool.received_path("1.1"), (10, 10))
    os.utime(spool.received_path("1.2"), (20, 20))

    found = spool.recover()
    assert found.to_segment == ["1.1", "1.2"]
    assert found.to_send == ["1.3", "1.4"]
    assert found.removed_partial == 1 and found.removed_tmp == 1
    assert not spool.received_path("1.3").exists()
    assert [n for n, _ in spool.unsent("1.3")] == ["seg", "sr"]
    assert [n for n, _ in spool.unsent("1.4")] == ["sr"]
    assert not spool.results_dir("1.5").exists()
    # an instance received again is not segmented twice: delivered, or results waiting
    assert not spool.receive("1.5", b"e")
    assert not spool.receive("1.3", b"c")
    assert spool.receive("1.1", b"a")  # still waiting for the model: the same file again
    assert spool.counts() == {"received": 2, "results": 2, "done": 1, "failed": 0}


@pytest.mark.parametrize("uid", ["", "../../etc/passwd", "1.2.3a", "1." + "2" * 70, "1..2"])
def test_only_valid_uids_name_spool_files(uid):
    from ptxseg.dicomnode.spool import check_uid
    from ptxseg.errors import DataError

    with pytest.raises(DataError, match="not a valid UID"):
        check_uid(uid)
