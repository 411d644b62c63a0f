"""The handful of attributes every C-STORE needs, read straight from the received bytes.

Why not pydicom here: building a full ``Dataset`` for each instance cost more than the disk flush
(0.7-2.5 ms against 1.3 ms), for six values. This walker reads the top level of a little-endian
data set up to (0028,0008), steps over sequences without decoding them, and gives up (returns None)
on anything unusual, big-endian, deflated, or cut short, so the caller falls back to pydicom.
"""

from __future__ import annotations

import struct

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

WANTED = {
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00201002: "ImagesInAcquisition",
    0x00280008: "NumberOfFrames",
}
LAST = max(WANTED)
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
VRS = LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH",
                  b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG_LEN = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")


class _Unreadable(Exception):
    pass


def _element(buf: bytes | bytearray, off: int, explicit: bool) -> tuple[int, int, int, bool]:
    """(tag, value offset, value length, value is implicit VR) of the element at ``off``."""
    if explicit:
        group, elem, vr, short = _EXPLICIT.unpack_from(buf, off)
        tag = (group << 16) | elem
        if group == 0xFFFE or vr not in VRS:  # not explicit VR after all (some senders get this wrong)
            raise _Unreadable("not an explicit VR element")
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, off + 8)
            return tag, off + 12, length, vr == b"UN"
        return tag, off + 8, short, False
    group, elem, length = _TAG_LEN.unpack_from(buf, off)
    return (group << 16) | elem, off + 8, length, True


def _skip_sequence(buf: bytes | bytearray, off: int, explicit: bool, depth: int) -> int:
    if depth > 16:
        raise _Unreadable("sequences nested too deep")
    while True:
        group, elem, length = _TAG_LEN.unpack_from(buf, off)
        tag, off = (group << 16) | elem, off + 8
        if tag == SEQUENCE_END:
            return off
        if tag != ITEM:
            raise _Unreadable("not an item")
        if length != UNDEFINED:
            off += length
            continue
        while True:
            (g, e) = struct.unpack_from("<HH", buf, off)
            if (g << 16) | e == ITEM_END:
                off += 8
                break
            off = _skip(buf, off, explicit, depth + 1)


def _skip(buf: bytes | bytearray, off: int, explicit: bool, depth: int) -> int:
    _, value, length, implicit_inside = _element(buf, off, explicit)
    if length == UNDEFINED:
        return _skip_sequence(buf, value, explicit and not implicit_inside, depth)
    return value + length


def quick_header(dataset_head: bytes | bytearray, transfer_syntax: str, complete: bool) -> dict[str, str] | None:
    """The WANTED attributes as stripped strings (absent ones left out), or None: use pydicom.

    ``complete`` says whether ``dataset_head`` is the whole data set or only its first bytes."""
    if transfer_syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        return None
    explicit = transfer_syntax != ImplicitVRLittleEndian
    buf = dataset_head
    out: dict[str, str] = {}
    off = 0
    try:
        while off < len(buf):
            tag, value, length, implicit_inside = _element(buf, off, explicit)
            if tag > LAST:
                return out
            if length == UNDEFINED:
                off = _skip_sequence(buf, value, explicit and not implicit_inside, 0)
                continue
            end = value + length
            if tag in WANTED:
                if end > len(buf):
                    return None
                out[WANTED[tag]] = buf[value:end].rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
            off = end
    except (struct.error, _Unreadable, UnicodeDecodeError):
        return None
    return out if complete and off == len(buf) else None
