"""``ptxseg dicom-node``: a DICOM node that receives radiographs and sends SEG + SR back.

A modality or the PACS pushes CR / DX radiographs to it (C-STORE); each received instance is
written to a spool folder before it is acknowledged, segmented by the run's model in
micro-batches (the masks of ``ptxseg predict``), and its results (a DICOM SEG, a TID 1500
Measurement Report SR, optionally a captioned Secondary Capture marked not for diagnostic use)
are sent back by C-STORE or STOW-RS, retried while the destination is down.

- :mod:`ptxseg.dicomnode.spool`: the spool folder: what was received, what is ready to send,
  what was delivered; the state on disk, so a kill at any moment loses and repeats nothing;
- :mod:`ptxseg.dicomnode.scp`: the C-ECHO / C-STORE service class provider (the SOP classes
  accepted, the allowed calling AE titles, TLS, the DIMSE status of every refusal);
- :mod:`ptxseg.dicomnode.segment`: the one inference function (model + rule -> native mask);
- :mod:`ptxseg.dicomnode.report`: the TID 1500 Measurement Report (highdicom);
- :mod:`ptxseg.dicomnode.capture`: the Secondary Capture of the captioned overlay;
- :mod:`ptxseg.dicomnode.sender`: C-STORE and STOW-RS destinations, back-off;
- :mod:`ptxseg.dicomnode.node`: the loop that joins them (worker and sender threads).

It needs the ``dicom-node`` extra (pynetdicom, dicomweb-client): ``pip install
'ptxseg[dicom-node]'``. The command line checks for it first (:func:`missing_extra`).
"""

from __future__ import annotations

import importlib.util

#: the packages of the ``dicom-node`` extra, by import name
EXTRA_MODULES = ("pynetdicom", "dicomweb_client")
EXTRA_HINT = "pip install 'ptxseg[dicom-node]'"


def missing_extra() -> list[str]:
    """The packages of the ``dicom-node`` extra that are not installed."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
