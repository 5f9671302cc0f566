"""``ptxseg dicom-node`` against a real Orthanc, on the 12 real SIIM-ACR DICOMs.

One Orthanc (the PACS) and one node per module. A modality (dcmtk's ``storescu``) sends the 12
radiographs to Orthanc; Orthanc's Lua autorouting (the one of docs/hospital.md) forwards CR /
DX to the node; the node sends a SEG, an SR and a Secondary Capture per image back to Orthanc.
What Orthanc stores is then checked against ``ptxseg predict`` on the same files with the same
run (masks, results.csv), against the source UIDs, and by ``dciodvfy``. The refusals (unknown
calling AE title, an SR, hostile data sets) are sent straight to the node.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.dicomnode_util import (
    AUTOROUTE_LUA,
    MODALITY_AET,
    NODE_AET,
    ORTHANC_AET,
    NodeProcess,
    Orthanc,
    content_items,
    need,
    node_run,
    storescu,
    wait_for,
)

pytest.importorskip("pynetdicom", reason="ptxseg dicom-node needs the dicom-node extra")

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, sample_dir):
    """Orthanc with the autorouting Lua, the node (``--secondary-capture``), and the 12 SIIM
    DICOMs sent by storescu to Orthanc and answered (48 instances in Orthanc)."""
    tools = need("Orthanc", "storescu", "echoscu", "dciodvfy")
    root = tmp_path_factory.mktemp("dicom_node")
    run = node_run(root)
    files = sorted((sample_dir / "dicom").glob("*.dcm"))
    assert len(files) == 12
    orthanc = Orthanc(root / "orthanc", lua=AUTOROUTE_LUA).start()
    node = None
    try:
        node = NodeProcess(
            [str(run), "--spool", str(root / "spool"), "--ae-title", NODE_AET,
             "--send-to", f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}",
             "--allow", ORTHANC_AET, "--allow", MODALITY_AET, "--secondary-capture",
             "--device", "cpu", "--retry-max-s", "2", "--batch-wait-ms", "100"],
            cwd=root,
        )  # fmt: skip
        orthanc.put_modality("ptxseg", NODE_AET, node.port)
        sent = storescu(tools["storescu"], orthanc.dicom_port, files, called=ORTHANC_AET)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: orthanc.count() >= 48 and len(node.delivered()) >= 12, 120,
                 "12 SEG + 12 SR + 12 SC back in Orthanc")  # fmt: skip
        yield SimpleNamespace(root=root, run=run, files=files, orthanc=orthanc, node=node,
                              tools=tools, stored=orthanc.by_modality())  # fmt: skip
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def predicted(pacs):
    """``ptxseg predict`` of the same 12 files with the same run: masks and results.csv."""
    from ptxseg.predict import predict

    out = pacs.root / "predict"
    predict(pacs.run, pacs.files, out, device="cpu", workers=0, progress=False, overlays=False)
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = {row["id"]: row for row in csv.DictReader(fh)}
    return SimpleNamespace(out=out, rows=rows)


def test_every_image_comes_back_as_one_seg_one_sr_one_sc(pacs):
    stored = pacs.stored
    assert sorted((k, len(v)) for k, v in stored.items()) == [
        ("CR", 12), ("OT", 12), ("SEG", 12), ("SR", 12)]  # fmt: skip
    sources = {str(ds.SOPInstanceUID): ds for ds in stored["CR"]}
    assert set(sources) == {f.stem for f in pacs.files}
    for kind in ("SEG", "SR", "OT"):
        referenced = []
        for ds in stored[kind]:
            if kind == "SEG":
                ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                referenced.append(str(ref.ReferencedSOPInstanceUID))
            elif kind == "OT":
                referenced.append(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
            else:
                evidence = {str(i.ReferencedSOPInstanceUID)
                            for s in ds.CurrentRequestedProcedureEvidenceSequence
                            for r in s.ReferencedSeriesSequence
                            for i in r.ReferencedSOPSequence}  # fmt: skip
                referenced.append(next(iter(evidence & set(sources))))
            source = sources[referenced[-1]]
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.PatientID == source.PatientID
        assert sorted(referenced) == sorted(sources), f"{kind}: not one per source"
    # the node logs one line per image, with its latency
    assert len(pacs.node.delivered()) == 12


def test_seg_frames_are_predicts_masks(pacs, predicted):
    from ptxseg.data.imageio import read_mask

    positives = 0
    for seg in pacs.stored["SEG"]:
        source = str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                     .ReferencedSOPInstanceUID)  # fmt: skip
        frame = np.asarray(seg.pixel_array)
        frame = frame[0] if frame.ndim == 3 else frame
        want = read_mask(predicted.out / "masks" / f"{source}.png", (1024, 1024))
        assert frame.shape == want.shape == (1024, 1024)
        np.testing.assert_array_equal(frame.astype(np.uint8), want, err_msg=source)
        positives += int(want.any())
    assert 0 < positives < 12  # both kinds of answer are compared


def _sr_values(sr) -> dict:
    values: dict = {}
    for code, item in content_items(sr):
        if item.ValueType == "CODE" and code in ("36118008", "272741003"):
            values[code] = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "NUM":
            values[code] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT" and code == "121106":
            values["comment"] = str(item.TextValue)
        elif item.ValueType == "IMAGE" and code == "121214":
            values["segmentation"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif item.ValueType == "TEXT" and code == "111002":  # Algorithm Parameters
            values.setdefault("parameters", []).append(str(item.TextValue))
    return values


def test_sr_measurements_are_predicts_results(pacs, predicted):
    from ptxseg.fileio import sha256_file

    segs = {str(ds.SOPInstanceUID): ds for ds in pacs.stored["SEG"]}
    sha = sha256_file(pacs.run / "best.ckpt")
    sides = {"24028007": "right", "7771000": "left", "51440002": "both"}
    for sr in pacs.stored["SR"]:
        assert sr.SOPClassUID == SR_CLASS
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.CompletionFlag == "COMPLETE"
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        values = _sr_values(sr)
        seg = segs[values["segmentation"]]
        source = str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                     .ReferencedSOPInstanceUID)  # fmt: skip
        row = predicted.rows[source]
        positive = row["has_pneumothorax"] == "1"
        assert values["36118008"] == ("52101004" if positive else "2667000"), source
        if positive:
            assert sides[values["272741003"]] == row["side"]
        else:
            assert "272741003" not in values
        assert values["MAXPROB"] == pytest.approx(float(row["max_prob"]), abs=1e-6)
        assert values["42798000"] == pytest.approx(float(row["area_cm2"]), abs=1e-4)
        # predict's pixel-spacing caveat (SIIM: too small for a chest) travels with the area
        assert row["area_note"] in values["comment"] and "small for an adult chest" in \
            values["comment"]
        assert f"model_sha256={sha}" in values["parameters"]
        assert "tta=none" in values["parameters"]


def test_dciodvfy_finds_no_error_in_any_object_written(pacs, tmp_path):
    checked = 0
    for kind in ("SEG", "SR", "OT"):
        for ds in pacs.stored[kind]:
            path = tmp_path / f"{kind}-{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out = subprocess.run([pacs.tools["dciodvfy"], str(path)], capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
            text = out.stdout + out.stderr
            errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
            assert not errors, f"{kind} {ds.SOPInstanceUID}:\n{text}"
            checked += 1
    assert checked == 36


def test_secondary_capture_is_marked_not_for_diagnostic_use(pacs):
    for sc in pacs.stored["OT"]:
        assert sc.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
        assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3


def test_echo_answers_only_allowed_callers(pacs):
    echoscu = need("echoscu")["echoscu"]
    ok = subprocess.run([echoscu, "-aet", MODALITY_AET, "-aec", NODE_AET, "127.0.0.1",
                         str(pacs.node.port)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([echoscu, "-aet", "STRANGER", "-aec", NODE_AET, "127.0.0.1",
                              str(pacs.node.port)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr, refused.stderr
    assert "Calling AE Title Not Recognized" in refused.stderr, refused.stderr


def test_an_unknown_calling_ae_title_cannot_store(pacs):
    before = pacs.orthanc.count()
    out = storescu(pacs.tools["storescu"], pacs.node.port, pacs.files[:1], calling="STRANGER")
    assert out.returncode != 0
    assert "Association Rejected" in out.stderr, out.stderr
    assert pacs.orthanc.count() == before
    assert not list((pacs.root / "spool" / "received").glob("*.dcm"))


def test_an_sr_or_seg_is_refused_at_association(pacs, tmp_path):
    """An SR or SEG sent to the node: its presentation context is rejected (abstract syntax
    not supported), so storescu has no context to send it in, and Orthanc's store fails."""
    sr = pacs.stored["SR"][0]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = storescu(pacs.tools["storescu"], pacs.node.port, [path])
    assert out.returncode != 0
    assert "No presentation context" in out.stderr, out.stderr
    # the same through the PACS: Orthanc's C-STORE of its SR to the node fails
    orthanc_id = next(i for i in pacs.orthanc.instance_ids()
                      if pacs.orthanc.get(f"/instances/{i}/tags?simplify")["Modality"] == "SR")
    with pytest.raises(Exception) as failed:  # urllib's HTTPError: Orthanc answers an error
        pacs.orthanc.request("POST", "/modalities/ptxseg/store", orthanc_id.encode())
    assert getattr(failed.value, "code", None) is not None and failed.value.code >= 400
    # and with pynetdicom: the context is rejected with reason "abstract syntax not supported"
    from pynetdicom import AE

    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context(SR_CLASS)
    ae.add_requested_context(SEG_CLASS)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification: the association opens
    assoc = ae.associate("127.0.0.1", pacs.node.port, ae_title=NODE_AET)
    try:
        assert assoc.is_established
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
        assert {(c.abstract_syntax, c.result) for c in assoc.rejected_contexts} == {
            (SR_CLASS, 0x03), (SEG_CLASS, 0x03)}  # fmt: skip
    finally:
        assoc.release()
    assert not list((pacs.root / "spool" / "received").glob("*.dcm"))


def _store(port: int, dataset) -> tuple[int, str]:
    from pynetdicom import AE

    ae = AE(ae_title=MODALITY_AET)
    sop_class = "1.2.840.10008.5.1.4.1.1.7" if isinstance(dataset, Path) else dataset.SOPClassUID
    for syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"):  # JPEG Baseline, explicit
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        answer = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    return int(answer.Status), str(answer.get("ErrorComment", ""))


def test_hostile_data_sets_get_a_failure_status_and_the_node_serves_on(pacs, tmp_path):
    from pydicom import dcmread
    from pynetdicom import _config

    before = pacs.orthanc.count()
    # a truncated file: its JPEG pixel data cut in the middle (sent as is, not re-encoded)
    data = pacs.files[0].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        code, comment = _store(pacs.node.port, cut)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert code == 0xC000, (hex(code), comment)
    assert "truncated" in comment or "cannot" in comment
    # a header that claims 60000 x 60000 pixels (3.6 GB) over 16 bytes of pixel data
    ds = dcmread(pacs.files[1])
    ds.decompress()
    ds.Rows = ds.Columns = 60000
    ds.PixelData = bytes(16)
    code, comment = _store(pacs.node.port, ds)
    assert code == 0xC001, (hex(code), comment)
    assert "limit" in comment
    # a Secondary Capture that is not a radiograph (modality OT: the node's own overlays)
    code, comment = _store(pacs.node.port, pacs.stored["OT"][0])
    assert code == 0x0122, (hex(code), comment)
    # nothing was kept or answered, and the node still works
    assert not list((pacs.root / "spool" / "received").glob("*.dcm"))
    assert pacs.node.proc.poll() is None
    echoscu = need("echoscu")["echoscu"]
    ok = subprocess.run([echoscu, "-aet", MODALITY_AET, "-aec", NODE_AET, "127.0.0.1",
                         str(pacs.node.port)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert pacs.orthanc.count() == before


def test_an_image_sent_again_is_not_answered_twice(pacs):
    before = pacs.orthanc.count()
    out = storescu(pacs.tools["storescu"], pacs.node.port, pacs.files[:2])
    assert out.returncode == 0, out.stderr
    wait_for(lambda: pacs.node.text().count("already answered") >= 2, 30, "two log lines")
    assert pacs.orthanc.count() == before


def test_results_can_go_by_stow_rs(pacs, tmp_path):
    """A node in this process whose destination is Orthanc's DICOMweb STOW-RS endpoint: a copy
    of one SIIM image under a new SOP Instance UID comes back as a SEG (the same frame as the
    original's) and an SR referencing the copy."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from ptxseg.dicomnode.node import Options, load
    from ptxseg.dicomnode.sender import StowDestination

    copy = dcmread(pacs.files[0])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    destination = StowDestination(f"{pacs.orthanc.url}/dicom-web")
    node = load(pacs.run, spool=tmp_path / "spool", destination=destination, device="cpu",
                options=Options(ae_title=NODE_AET, port=0))  # fmt: skip
    node.start()
    try:
        assert _store(node.port, copy) == (0x0000, "")
        wait_for(lambda: len(list((tmp_path / "spool" / "done").glob("*.json"))) == 1, 60,
                 "the copy answered")  # fmt: skip
    finally:
        node.stop()
    stored = pacs.orthanc.by_modality()

    def source_of(seg):
        return str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                   .ReferencedSOPInstanceUID)  # fmt: skip

    new = [s for s in stored["SEG"] if source_of(s) == copy.SOPInstanceUID]
    old = [s for s in stored["SEG"] if source_of(s) == pacs.files[0].stem]
    assert len(new) == len(old) == 1
    np.testing.assert_array_equal(new[0].pixel_array, old[0].pixel_array)
    reports = [sr for sr in stored["SR"] if _sr_values(sr)["segmentation"] == new[0].SOPInstanceUID]
    assert len(reports) == 1


def test_the_documented_lua_is_the_tested_one():
    from tests.conftest import REPO

    assert AUTOROUTE_LUA.strip() in (REPO / "docs" / "hospital.md").read_text(encoding="utf-8")


def test_an_image_no_seg_can_be_made_of_is_kept_in_failed_and_nothing_is_sent(pacs, tmp_path):
    """A two-frame CR is accepted (its first frame reads, as predict reads it) but no SEG can
    be made of it: it goes to ``failed/`` with the reason, nothing reaches the PACS, and the
    next image is answered."""
    import json

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from ptxseg.dicomnode.node import Options, load
    from ptxseg.dicomnode.sender import DicomDestination
    from tests.conftest import write_dicom

    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    uid = generate_uid()
    path = write_dicom(tmp_path / "two.dcm", frames[0], SOPInstanceUID=uid, NumberOfFrames=2,
                       StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    ds = dcmread(path)
    ds.PixelData = frames.tobytes()
    before = pacs.orthanc.count()
    spool = tmp_path / "spool"
    destination = DicomDestination(f"{ORTHANC_AET}@127.0.0.1:{pacs.orthanc.dicom_port}", NODE_AET)
    node = load(pacs.run, spool=spool, destination=destination, device="cpu",
                options=Options(ae_title=NODE_AET, port=0))  # fmt: skip
    node.start()
    try:
        assert _store(node.port, ds) == (0x0000, "")
        wait_for(lambda: (spool / "failed" / f"{uid}.json").exists(), 60, "the failed record")
        record = json.loads((spool / "failed" / f"{uid}.json").read_text(encoding="utf-8"))
        assert "multi-frame" in record["reason"]
        assert (spool / "failed" / f"{uid}.dcm").read_bytes()[128:132] == b"DICM"
        assert not list((spool / "received").iterdir())
        assert pacs.orthanc.count() == before
        assert node.healthy()
    finally:
        node.stop()
