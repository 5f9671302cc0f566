"""The attributes a derived DICOM object (a SEG, an SR) takes from its source image, made valid
for their Value Representations: whatever the source holds, nothing invalid is copied on.

A source DICOM is often not valid itself (SIIM-ACR's ``PatientAge`` is ``42`` where the AS VR
needs ``042Y``; its ``PixelSpacing`` has 19-character DS values where 16 is the limit), and a
library that builds a SEG copies the Patient and Study modules as they are. The rules
(PS3.5 section 6.2 for the VRs, PS3.3 for the attribute types):

- **the UIDs a derived object references** (:data:`REFERENCED_UIDS`: Study, Series and SOP
  Instance UID, SOP Class UID) must be present, not empty, at most 64 characters of digits and
  dots without leading zeros: else :func:`check_referenced_uids` refuses the source
  (:class:`~ptxseg.errors.DataError` naming the attribute). A malformed Frame of Reference UID
  is refused too (the SEG copies it); an empty one is removed (no frame of reference);
- **every other root attribute** (private ones, the file meta group and the pixel data
  aside) is checked against its VR by :func:`clean_source`: a value whose intent is obvious
  is repaired (:func:`repair_value`: an AS age without its unit, ``42`` -> ``042Y``; a date
  ``1990-01-31`` -> ``19900131``; a time ``12:30:05`` -> ``123005``; a DS number longer than
  16 characters rewritten in 16; a CS code in lower case in upper case); any other invalid
  value is dropped: emptied where the attribute is Type 2 in the modules a derived object
  copies (:data:`TYPE_2`: ``PatientName``, ``StudyDate`` ...; a Type 2 attribute must be
  present), removed otherwise. A Type 1 attribute of those modules (:data:`TYPE_1`: the
  clinical-trial sponsor, protocol id ...) that is invalid refuses the source. A sequence
  with an invalid value anywhere inside is dropped whole, by the same rule;
- ``PatientOrientation`` is kept only when it is two valid biped directions (``L\\F``; the
  derived object carries no Anatomical Orientation Type), else emptied: PS3.3 C.7.6.1 makes it
  Type 2C, "empty if unknown", for an image without Image Orientation (Patient);
- an unknown ``SpecificCharacterSet`` is replaced by ``ISO_IR 192`` (UTF-8): pydicom has
  already decoded the values, and UTF-8 can write any of them.

:func:`clean_source` returns a copy (the source is never changed) and the list of
:class:`Change`\\ s. :func:`invalid_uids` finds any invalid UID in a dataset about to be
written, sequences included: the last check before a derived object is saved.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
from dataclasses import dataclass
from typing import Any

from ptxseg.errors import DataError, one_line

#: the source UIDs a derived object references: refused when missing, empty or malformed
REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

#: Type 2 and 2C attributes of the modules a derived object copies from its source (PS3.3
#: C.7.1.1 Patient, C.7.1.3 Clinical Trial Subject, C.7.2.1 General Study, C.7.2.2 Patient
#: Study, C.7.2.3 Clinical Trial Study) and General Image's PatientOrientation: an invalid
#: value is emptied, never removed
TYPE_2 = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsibleOrganization", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "PatientSexNeutered", "ClinicalTrialTimePointID",
    "PatientOrientation",
})  # fmt: skip
#: Type 1 and 1C attributes of those modules (the UIDs aside): an invalid value refuses the
#: source
TYPE_1 = frozenset({
    "PatientAlternativeCalendar", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "ResponsiblePersonRole", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "LongitudinalTemporalEventType",
})  # fmt: skip

#: the largest value of the IS VR (a signed 32-bit integer)
IS_MAX = 2**31 - 1

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_MAX_BYTES = {"AE": 16, "CS": 16, "DS": 16, "IS": 12, "UI": 64, "SH": 16, "LO": 64,
              "ST": 1024, "LT": 10240}  # fmt: skip
# control characters: none in the one-line VRs (ESC sequences are decoded by pydicom, so an
# ESC left in a value is a broken one); TAB, LF, FF, CR in the text VRs
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_ONE_LINE_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI",
                 "UR"}  # fmt: skip
_TEXT_VRS = {"LT", "ST", "UT"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "AT", "US", "SS", "UL", "SL", "UV", "SV"}
_CS = re.compile(r"[A-Z0-9 _]*")
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
_DS = re.compile(r" *[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)? *")
_IS = re.compile(r" *[+\-]?\d+ *")
_AS = re.compile(r"\d{3}[DWMY]")
_AS_LOOSE = re.compile(r"0*(\d{1,3}) *([DWMYdwmy]?)")
_DA = re.compile(r"\d{8}")
_DA_LOOSE = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?")
_TM_LOOSE = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?")
_DT = re.compile(r"(\d{4})((\d{2})((\d{2})(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+\-]\d{4})?")
_UR = re.compile(r"[A-Za-z_\d:/?#\[\]@!$&'()*+,;=%\-.~]*")
#: biped patient directions (PS3.3 C.7.6.1.1.1): one to three letters of different axes
_AXIS = {"L": 0, "R": 0, "A": 1, "P": 1, "H": 2, "F": 2}
_SHOWN = 48  # characters of a value shown in a message


@dataclass(frozen=True)
class Change:
    """One attribute of the source changed in the copy: repaired (``after`` is the new value),
    emptied (``after == ""``) or removed (``after is None``)."""

    keyword: str
    tag: str  # "(0010,1010)"
    before: str
    after: str | None
    reason: str

    def describe(self) -> str:
        what = "removed" if self.after is None else (
            "emptied" if self.after == "" else f"written {self.after}")  # fmt: skip
        return f"{self.keyword} {self.tag} {self.before}: {self.reason}, {what}"


@dataclass(frozen=True)
class CleanSource:
    """A copy of a source header whose every root attribute is valid for its VR, and what
    was changed to make it so."""

    dataset: Any
    changes: tuple[Change, ...]


def shown(value: Any) -> str:
    """A value as a message shows it: control characters escaped, at most :data:`_SHOWN`
    characters (then ``...``), quoted."""
    text = str(value)
    cut = text[:_SHOWN] + ("..." if len(text) > _SHOWN else "")
    return f"'{one_line(cut)}'"


def _tag(tag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def valid_uid(value: Any) -> bool:
    """A UID as PS3.5 9.1 allows: 1 to 64 characters, digits and dots, components without
    a leading zero."""
    text = str(value)
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def uid_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid UID (``None`` when it is)."""
    text = str(value)
    if not text.strip():
        return "is empty"
    if len(text) > 64:
        return f"{shown(text)} is not a valid UID ({len(text)} characters, at most 64)"
    if _UID.fullmatch(text) is None:
        return f"{shown(text)} is not a valid UID (digits and dots, no leading zero)"
    return None


def check_referenced_uids(ds, name: str, product: str = "DICOM SEG") -> None:
    """Refuse a source whose :data:`REFERENCED_UIDS` (or Frame of Reference UID, when not
    empty) are missing, empty or malformed.

    Raises:
        DataError: ``name: StudyInstanceUID (0020,000D) is empty: the DICOM SEG must
            reference it (Type 1), no DICOM SEG is written``.
    """
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    for keyword in (*REFERENCED_UIDS, "FrameOfReferenceUID"):
        tag = Tag(tag_for_keyword(keyword))
        label = f"{keyword} {_tag(tag)}"
        if tag not in ds:
            if keyword == "FrameOfReferenceUID":
                continue
            problem = "is missing"
        else:
            value = _value(ds, tag)
            if keyword == "FrameOfReferenceUID" and value is not None and not str(value).strip():
                continue  # empty: no frame of reference (clean_source removes it)
            problem = "cannot be read" if value is None else uid_problem(value)
        if problem is not None:
            raise DataError(
                name, f"{label} {problem}: the {product} must reference it (Type 1), "
                f"no {product} is written",
            )  # fmt: skip


def _value(ds, tag) -> Any:
    """The element's value, or ``None`` when pydicom cannot convert it (a corrupt value)."""
    try:
        return ds[tag].value
    except Exception:  # noqa: BLE001 - pydicom raises many types on corrupt values
        return None


# ---------------------------------------------------------------------------------------------
# values


def _real_date(y: str, m: str, d: str) -> bool:
    try:
        datetime.date(int(y), int(m), int(d))
    except ValueError:
        return False
    return True


def _check_text(vr: str, text: str) -> bool:
    """``text`` (one value, decoded) valid for the string VR ``vr`` as it stands."""
    if vr in _ONE_LINE_VRS and _CONTROL.search(text):
        return False
    if vr in _TEXT_VRS and _TEXT_CONTROL.search(text):
        return False
    if vr in _MAX_BYTES and len(text.encode("utf-8")) > _MAX_BYTES[vr]:
        # bytes for the ASCII VRs; for SH/LO/ST/LT the limit is in characters, which a
        # multi-byte character set may exceed in bytes: count characters there
        if vr in ("AE", "CS", "DS", "IS", "UI") or len(text) > _MAX_BYTES[vr]:
            return False
    if vr == "CS":
        return _CS.fullmatch(text) is not None
    if vr == "AE":
        return _AE.fullmatch(text) is not None and bool(text.strip())
    if vr == "DS":
        return _DS.fullmatch(text) is not None and math.isfinite(float(text))
    if vr == "IS":
        return _IS.fullmatch(text) is not None and -IS_MAX - 1 <= int(text) <= IS_MAX
    if vr == "AS":
        return _AS.fullmatch(text) is not None
    if vr == "DA":
        return _DA.fullmatch(text) is not None and _real_date(text[:4], text[4:6], text[6:])
    if vr == "TM":
        return _TM.fullmatch(text.rstrip()) is not None
    if vr == "DT":
        m = _DT.fullmatch(text.rstrip())
        return m is not None and _valid_dt(text.rstrip())
    if vr == "UI":
        return valid_uid(text)
    if vr == "UR":
        return _UR.fullmatch(text.rstrip()) is not None
    if vr == "PN":
        groups = text.split("=")
        return len(groups) <= 3 and all(
            len(g) <= 64 and len(g.split("^")) <= 5 for g in groups
        )
    return True  # LO, SH, LT, ST, UT, UC: length and characters checked above


def _valid_dt(text: str) -> bool:
    body = re.split(r"[+\-]", text[4:], maxsplit=1)[0] if len(text) > 4 else ""
    full = text[:4] + body
    parts = [full[i:j] for i, j in ((4, 6), (6, 8), (8, 10), (10, 12), (12, 14))]
    month, day, hour, minute, sec = (int(p) if p else None for p in parts)
    if month is not None and not 1 <= month <= 12:
        return False
    if day is not None and not _real_date(full[:4], full[4:6], full[6:8]):
        return False
    return (hour is None or hour <= 23) and (minute is None or minute <= 59) and (
        sec is None or sec <= 60)  # fmt: skip


def repair_value(vr: str, text: str) -> str | None:
    """``text`` (one value) made valid for ``vr`` when the intent is obvious, else ``None``.

    The repairs: AS ``42``, ``42Y``, ``42 y`` -> ``042Y`` (a bare number is years);
    DA ``YYYY-MM-DD`` (or ``.`` / ``/``) -> ``YYYYMMDD`` when the date exists; TM ``HH:MM``,
    ``HH:MM:SS[.frac]`` -> ``HHMM[SS[.ffffff]]`` (fraction cut to 6 digits); DS a finite
    number in at most 16 characters, with at most 15 significant digits
    (``0.14300000000000002`` -> ``0.143``); CS in upper case. A value valid as it stands is
    returned unchanged.
    """
    if _check_text(vr, text):
        return text
    stripped = text.strip()
    candidate: str | None = None
    if vr == "AS" and (m := _AS_LOOSE.fullmatch(stripped)) and int(m.group(1)) > 0:
        candidate = f"{int(m.group(1)):03d}{(m.group(2) or 'Y').upper()}"
    elif vr == "DA" and (m := _DA_LOOSE.fullmatch(stripped)):
        candidate = "".join(m.groups())
    elif vr == "TM" and (m := _TM_LOOSE.fullmatch(stripped)):
        hh, mm, ss, frac = m.groups()
        candidate = hh + mm + (ss or "") + (f".{frac[:6]}" if ss and frac else "")
    elif vr == "DS" and not _CONTROL.search(stripped):
        try:
            number = float(stripped)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            candidate = _ds_text(number)
    elif vr == "CS":
        candidate = stripped.upper()
    elif vr in ("IS", "UI", "AE"):
        candidate = stripped if stripped != text else None
    return candidate if candidate is not None and _check_text(vr, candidate) else None


def _ds_text(number: float) -> str:
    """``number`` in at most 16 characters, with as many significant digits as fit (15 at
    most: ``0.14300000000000002`` -> ``0.143``)."""
    for digits in range(15, 0, -1):
        text = f"{number:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{number:.0e}"


def _texts(elem) -> list[str] | None:
    """The element's values as decoded strings (one per value), or ``None`` when pydicom
    cannot convert them."""
    try:
        value = elem.value
    except Exception:  # noqa: BLE001 - a corrupt value
        return None
    if value is None:
        return []
    from pydicom.multival import MultiValue

    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, bytes):
            return None  # a string VR pydicom could not decode
        original = getattr(v, "original_string", None)  # DS, IS: the text as read
        out.append(original if isinstance(original, str) else str(v))
    return out


def _clean_element(elem) -> tuple[Any, bool] | None:
    """``(value to write, repaired?)`` for a valid or repaired element, ``None`` for an
    invalid one. Sequences are checked item by item, recursively."""
    vr = elem.VR
    if vr == "SQ":
        try:
            items = list(elem.value)
        except Exception:  # noqa: BLE001
            return None
        repaired = False
        out = []
        for item in items:
            cleaned = _clean_items(item)
            if cleaned is None:
                return None
            out.append(cleaned[0])
            repaired |= cleaned[1]
        return (out, repaired)
    if vr in _BINARY_VRS or " or " in vr:  # numbers, bytes; "US or SS" (implicit VR)
        return (elem.value, False) if _value_ok(elem) else None
    if vr in ("FL", "FD"):
        try:
            values = elem.value
            numbers = list(values) if not isinstance(values, (int, float)) else [values]
            ok = all(math.isfinite(float(v)) for v in numbers)
        except Exception:  # noqa: BLE001
            return None
        return (elem.value, False) if ok else None
    if vr == "UN" or vr not in (_ONE_LINE_VRS | _TEXT_VRS):
        return None
    texts = _texts(elem)
    if texts is None:
        return None
    if not any(texts):
        return (elem.value, False)  # zero length: valid for every VR
    fixed = [repair_value(vr, t) for t in texts]
    if any(f is None for f in fixed):
        return None
    if fixed == texts:
        return (elem.value, False)
    return (fixed if len(fixed) > 1 else fixed[0], True)


def _value_ok(elem) -> bool:
    try:
        elem.value  # noqa: B018 - conversion errors surface here
    except Exception:  # noqa: BLE001
        return False
    return True


def _clean_items(item) -> tuple[Any, bool] | None:
    from pydicom.dataset import Dataset

    out = Dataset()
    repaired = False
    for tag in list(item.keys()):
        if tag.is_private:
            continue
        try:
            elem = item[tag]
        except Exception:  # noqa: BLE001
            return None
        cleaned = _clean_element(elem)
        if cleaned is None:
            return None
        out.add_new(tag, elem.VR, copy.deepcopy(cleaned[0]))
        repaired |= cleaned[1]
    return out, repaired


def orientation_problem(values: list[str]) -> str | None:
    """Why ``values`` is not a biped Patient Orientation (``None`` when it is): two values,
    each 1-3 letters of A/P/R/L/H/F of different axes, the two principal letters of
    different axes (PS3.3 C.7.6.1.1.1)."""
    if len(values) != 2:
        return f"{len(values)} value(s), 2 needed"
    for v in values:
        axes = [_AXIS.get(c) for c in v]
        if not 1 <= len(v) <= 3 or None in axes or len(set(axes)) != len(axes):
            return f"{shown(v)} is not a patient direction"
    if _AXIS[values[0][0]] == _AXIS[values[1][0]]:
        return "rows and columns along the same axis"
    return None


def clean_source(source, *, name: str | None = None, product: str = "DICOM SEG") -> CleanSource:
    """A copy of the header ``source`` whose root attributes are valid for their VRs (see
    the module docstring), its pixel data and private attributes left out.

    Args:
        source: a pydicom dataset (its pixel data, if loaded, is not copied; of its file meta
            information, only the Transfer Syntax UID).
        name: how to name the source in errors (default: its SOP Instance UID).
        product: what is derived, for the messages (``DICOM SEG``, ``DICOM SR``).

    Raises:
        DataError: a referenced UID missing, empty or malformed
            (:func:`check_referenced_uids`), or a :data:`TYPE_1` attribute invalid.
    """
    from pydicom.dataset import Dataset, FileMetaDataset

    label = name or str(_value(source, 0x00080018) or "source DICOM")
    check_referenced_uids(source, label, product)
    out = Dataset()
    syntax = getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and valid_uid(syntax):  # what a derived object reads of the meta
        out.file_meta = FileMetaDataset()
        out.file_meta.TransferSyntaxUID = syntax
    changes: list[Change] = []
    for tag in list(source.keys()):
        if tag.is_private or tag.group in (0x0002, 0x7FE0) or tag.group >= 0xFFFA:
            continue
        try:
            elem = source[tag]
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert
            elem = None
        if elem is None:
            keyword, vr = _dictionary(tag)
            changes.append(_drop(keyword, tag, "'?'", "unreadable", label, product, out, vr))
            continue
        keyword = elem.keyword or _tag(tag)
        if keyword == "SpecificCharacterSet":
            out.add(copy.deepcopy(elem))
            _check_charset(out, changes, tag)
            continue
        if keyword == "FrameOfReferenceUID" and not str(elem.value or "").strip():
            changes.append(Change(keyword, _tag(tag), "''", None, "empty"))
            continue
        cleaned = _clean_element(elem)
        before = _before(elem)
        if cleaned is None:
            changes.append(_drop(keyword, tag, before, f"invalid for {elem.VR}", label,
                                 product, out, elem.VR))  # fmt: skip
            continue
        value, repaired = cleaned
        if keyword == "PatientOrientation":
            values = [value] if isinstance(value, str) else [str(v) for v in value or []]
            values = [v for v in values if v]
            problem = orientation_problem(values) if values else None
            if problem is not None:
                changes.append(_drop(keyword, tag, before, problem, label, product, out, "CS"))
                continue
        out.add_new(tag, elem.VR, copy.deepcopy(value))
        if repaired:
            changes.append(Change(keyword, _tag(tag), before, _before(out[tag]),
                                  f"invalid for {elem.VR}"))  # fmt: skip
    return CleanSource(out, tuple(changes))


def _dictionary(tag) -> tuple[str, str | None]:
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    try:
        return keyword_for_tag(tag) or _tag(tag), dictionary_VR(tag)
    except KeyError:
        return _tag(tag), None


def _before(elem) -> str:
    if elem.VR == "SQ":
        return f"({len(elem.value)} item(s))"
    texts = _texts(elem)
    if texts is None:
        return "'?'"
    return shown("\\".join(texts))


def _drop(keyword, tag, before, reason, label, product, out, vr=None) -> Change:
    """Empty a :data:`TYPE_2` attribute in ``out``, refuse a :data:`TYPE_1` one, leave any
    other out; the :class:`Change`."""
    if keyword in TYPE_1:
        raise DataError(
            label, f"{keyword} {_tag(tag)} {before} is {reason}: the {product} must copy "
            f"it (Type 1), no {product} is written",
        )  # fmt: skip
    if keyword in TYPE_2 and vr is not None:
        out.add_new(tag, vr, [] if vr == "SQ" else "")
        return Change(keyword, _tag(tag), before, "", reason)
    return Change(keyword, _tag(tag), before, None, reason)


def _check_charset(out, changes: list[Change], tag) -> None:
    from pydicom.charset import python_encoding

    value = out[tag].value
    terms = [value] if isinstance(value, str) else list(value or [])
    known = all(not t or str(t).strip() in python_encoding for t in terms)
    if not known:
        changes.append(Change("SpecificCharacterSet", _tag(tag), shown("\\".join(
            str(t) for t in terms)), "ISO_IR 192", "unknown character set"))  # fmt: skip
        out[tag].value = "ISO_IR 192"


def invalid_uids(ds, where: str = "") -> list[str]:
    """The UI values of ``ds`` (sequences included) that are not valid UIDs, as
    ``"Keyword 'value'"``: the check before a derived object is written."""
    bad = []
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                bad += invalid_uids(item, f"{where}{elem.keyword}[{i}].")
        elif elem.VR == "UI" and elem.value is not None and str(elem.value) != "":
            values = elem.value if not isinstance(elem.value, str) else [elem.value]
            bad += [f"{where}{elem.keyword} {shown(v)}" for v in values if not valid_uid(v)]
    for name in ("MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID", "TransferSyntaxUID"):
        meta = getattr(ds, "file_meta", None)
        if not where and meta is not None and name in meta and not valid_uid(meta[name].value):
            bad.append(f"{name} {shown(meta[name].value)}")
    return bad


def derived_series_number(source, offset: int = 1000) -> int:
    """The derived series' number: the source's ``SeriesNumber + offset`` when that is a
    positive IS (at most :data:`IS_MAX`), else ``offset`` (no, an invalid or an extreme
    source number)."""
    raw = _value(source, 0x00200011)
    try:
        number = int(str(raw).strip()) if raw is not None and str(raw).strip() else 0
    except ValueError:
        number = 0
    total = number + offset
    return total if 1 <= total <= IS_MAX else offset
