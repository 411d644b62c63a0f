"""Is a received data set structurally whole? Decided while it streams in, before success is answered.

Why here and not in pydicom: the receiver writes the bytes it gets straight to the spool and never
reads the file back (see node/spool.py). A data set torn by a broken modality (Pixel Data shorter
than its own header says, an element cut off, encapsulated frames without their delimiter) used to
be acknowledged, and the sender then never resent it. This walker is fed the same fragments the spool
writes and steps over every element header (PS3.5 7.1): it keeps a few bytes of state, skips values
without copying them, and at the end says what, if anything, is wrong:

- every element and item fits in the item or sequence that holds it, and the last element ends
  exactly where the data set ends; every sequence and item of undefined length is closed;
- native Pixel Data holds Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated / 8
  bytes (rounded up to even);
- encapsulated Pixel Data (PS3.5 A.4) starts with a Basic Offset Table item, has at least one
  fragment per frame (or exactly one offset per frame, each at the start of a fragment), and ends
  with its sequence delimiter.

On the way it collects the top-level attributes the hot path needs (``WANTED``), so no other
header reader runs for a well-formed instance.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.datadict import DicomDictionary
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
VRS = LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                  b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
# top-level attributes kept while walking: strings for the hot path, unsigned shorts for the pixel check
WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00201002: "ImagesInAcquisition",
    0x00280004: "PhotometricInterpretation",
    0x00280008: "NumberOfFrames",
}
US_WANTED = {0x00280002: "SamplesPerPixel", 0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated"}
MAX_CAPTURED = 256            # a wanted attribute longer than this is not one we can use
MAX_OFFSET_TABLE = 16 << 20   # 4 M frames
MAX_DEPTH = 64
INFLATE_STEP = 1 << 20        # a deflated data set is inflated at most this much at a time (zip bombs)

# container kinds on the stack
_DATASET, _SEQUENCE, _ITEM, _FRAGMENTS = range(4)


class TornDataSet(Exception):
    """What is wrong with the data set, in words short enough for an Error Comment (64 characters)."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class StructureCheck:
    """Feed it the data set fragment by fragment (``feed``), then ask ``finish()`` for the verdict."""

    def __init__(self, transfer_syntax: str):
        self._ts_implicit = transfer_syntax == ImplicitVRLittleEndian
        self.explicit = not self._ts_implicit
        big = transfer_syntax == ExplicitVRBigEndian
        self._e = ">" if big else "<"
        self._tag_len = struct.Struct(self._e + "HHI")
        self._explicit_hdr = struct.Struct(self._e + "HH2sH")
        self._u32 = struct.Struct(self._e + "I")
        self._inflater = zlib.decompressobj(-15) if transfer_syntax == DeflatedExplicitVRLittleEndian else None
        self.attributes: dict[str, str] = {}
        self.numbers: dict[str, int] = {}
        self.problem: str | None = None
        self._tail = b""          # unparsed bytes carried to the next fragment (a header cut in two)
        self._skip = 0            # bytes of a value still to come that nobody needs to look at
        self._pos = 0             # absolute offset of the first byte not yet consumed
        # (kind, absolute end or None when undefined, implicit VR inside) for every open container
        self._stack: list[tuple[int, int | None, bool]] = [(_DATASET, None, not self.explicit)]
        self._fragments = 0
        self._fragment_starts: list[int] = []
        self._offsets: list[int] | None = None   # None: no Basic Offset Table item seen yet
        self._first_fragment = 0
        self._last_tag = 0                       # the element whose value was being skipped

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.problem is not None:
            return
        if self._inflater is not None:
            self._feed_inflated(data)
            return
        self._feed(data)

    def _feed_inflated(self, data: bytes | bytearray | memoryview) -> None:
        chunk = bytes(data)
        while chunk and self.problem is None:
            try:
                out = self._inflater.decompress(chunk, INFLATE_STEP)  # type: ignore[union-attr]
            except zlib.error:
                self.problem = "deflated data set cannot be inflated"
                return
            chunk = self._inflater.unconsumed_tail  # type: ignore[union-attr]
            if out:
                self._feed(out)

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if self._skip >= n and not self._tail:  # inside a long value (pixel data): the common case
            self._skip -= n
            self._pos += n
            return
        if self._tail:
            buf: bytes | bytearray | memoryview = self._tail + bytes(data)
            base = self._pos - len(self._tail)
        else:
            buf, base = data, self._pos
        off = self._skip
        self._skip = 0
        try:
            off = self._walk(buf, base, off)
        except TornDataSet as exc:
            self.problem = str(exc)
            return
        except struct.error:  # cannot happen: every unpack is preceded by a length check
            self.problem = "data set cannot be parsed"
            return
        if off > len(buf):
            self._skip = off - len(buf)
            off = len(buf)
        self._tail = bytes(buf[off:])
        self._pos = base + len(buf)

    # ------------------------------------------------------------------ the walk
    def _walk(self, buf: bytes | bytearray | memoryview, base: int, off: int) -> int:
        """Consume whole headers (and wanted values) from ``buf``; return where to resume, which may lie
        past the end of ``buf`` when a value continues in the next fragment."""
        stack = self._stack
        end = len(buf)
        tag_len = self._tag_len
        while True:
            # close defined-length containers that end here
            while stack[-1][1] is not None and base + off >= stack[-1][1]:  # type: ignore[operator]
                kind, limit, _ = stack[-1]
                if base + off > limit:  # type: ignore[operator]
                    raise TornDataSet(f"an element runs past the end of its {'item' if kind == _ITEM else 'sequence'}")
                stack.pop()
            if off + 8 > end:
                return off
            kind, limit, implicit = stack[-1]
            group, elem, length = tag_len.unpack_from(buf, off)
            tag = (group << 16) | elem
            if kind == _SEQUENCE or kind == _FRAGMENTS:
                nxt = self._sequence_entry(buf, kind, tag, length, base, off, limit)
                if nxt is None:  # the Basic Offset Table is still arriving
                    return off
                off = nxt
                continue
            # inside a data set or an item
            if tag == ITEM_END:
                if kind != _ITEM or limit is not None:
                    raise TornDataSet("item delimiter outside an item of undefined length")
                stack.pop()
                off += 8
                continue
            if group == 0xFFFE:
                raise TornDataSet(f"unexpected delimiter {_tag(tag)} in a data set")
            if implicit:
                vr = b""
                value = off + 8
            else:
                group, elem, vr, short = self._explicit_hdr.unpack_from(buf, off)
                if vr not in VRS:
                    if base + off == 0 and len(stack) == 1:
                        # implicit VR under an explicit transfer syntax: read on as pydicom does
                        self.explicit = False
                        stack[0] = (_DATASET, None, True)
                        continue
                    raise TornDataSet(f"element {_tag(tag)} has no valid VR")
                if vr in LONG_VRS:
                    if off + 12 > end:
                        return off
                    (length,) = self._u32.unpack_from(buf, off + 8)
                    value = off + 12
                else:
                    length, value = short, off + 8
            if length == UNDEFINED:
                if tag == PIXEL_DATA and len(stack) == 1:
                    self._begin_fragments(base + value)
                elif vr in (b"SQ", b"UN", b""):
                    if len(stack) >= MAX_DEPTH:
                        raise TornDataSet("sequences nested too deep")
                    stack.append((_SEQUENCE, None, implicit or vr == b"UN"))
                else:
                    raise TornDataSet(f"element {_tag(tag)} has undefined length")
                off = value
                continue
            if limit is not None and base + value + length > limit:
                raise TornDataSet(f"element {_tag(tag)} runs past the end of its item")
            if vr == b"SQ" or (vr == b"" and self._is_sequence(buf, value, length, tag)):
                if len(stack) >= MAX_DEPTH:
                    raise TornDataSet("sequences nested too deep")
                if length:
                    stack.append((_SEQUENCE, base + value + length, implicit))
                off = value
                continue
            if len(stack) == 1:
                if tag in WANTED or tag in US_WANTED:
                    if length <= MAX_CAPTURED:
                        if value + length > end:
                            return off  # wait for the whole (small) value
                        self._capture(tag, bytes(buf[value:value + length]))
                elif tag == PIXEL_DATA:
                    self._native_pixels(length)
            self._last_tag = tag
            off = value + length  # may lie past the end of buf: the rest is skipped as it arrives

    @staticmethod
    def _is_sequence(buf: bytes | bytearray | memoryview, value: int, length: int, tag: int) -> bool:
        """Implicit VR: the data dictionary says; for a private tag, a value that starts with an item tag is a
        sequence (pydicom's rule)."""
        entry = DicomDictionary.get(tag)
        if entry is not None:
            return bool(entry[0] == "SQ")
        if length < 8 or value + 4 > len(buf):
            return False
        return bytes(buf[value:value + 4]) == b"\xfe\xff\x00\xe0"

    def _sequence_entry(self, buf: bytes | bytearray | memoryview, kind: int, tag: int, length: int, base: int,
                        off: int, limit: int | None) -> int | None:
        """One entry of a sequence or of encapsulated Pixel Data; None: wait for more bytes."""
        stack = self._stack
        if tag == SEQUENCE_END:
            if limit is not None:
                raise TornDataSet("sequence delimiter in a sequence of defined length")
            if kind == _FRAGMENTS:
                self._end_fragments()
            stack.pop()
            return off + 8
        if tag != ITEM:
            what = "encapsulated Pixel Data" if kind == _FRAGMENTS else "a sequence"
            raise TornDataSet(f"{_tag(tag)} where {what} needs an item")
        if limit is not None and length != UNDEFINED and base + off + 8 + length > limit:
            raise TornDataSet("an item runs past the end of its sequence")
        if kind == _FRAGMENTS:
            if length == UNDEFINED:
                raise TornDataSet("Pixel Data fragment of undefined length")
            if self._offsets is None:  # the first item is the Basic Offset Table
                if length % 4:
                    raise TornDataSet("Basic Offset Table length is not a multiple of 4")
                if length > MAX_OFFSET_TABLE:
                    raise TornDataSet("Basic Offset Table too long")
                if off + 8 + length > len(buf):
                    return None
                raw = bytes(buf[off + 8:off + 8 + length])
                self._offsets = list(struct.unpack(f"{self._e}{length // 4}I", raw))
                self._first_fragment = base + off + 8 + length
                return off + 8 + length
            self._fragment_starts.append(base + off - self._first_fragment)
            self._fragments += 1
            self._last_tag = ITEM
            return off + 8 + length
        if length == UNDEFINED:
            stack.append((_ITEM, None, stack[-1][2]))
        elif length:
            stack.append((_ITEM, base + off + 8 + length, stack[-1][2]))
        return off + 8

    def _begin_fragments(self, _at: int) -> None:
        if self._ts_implicit:
            raise TornDataSet("encapsulated Pixel Data in implicit VR")
        self._stack.append((_FRAGMENTS, None, False))

    def _end_fragments(self) -> None:
        offsets = self._offsets
        if offsets is None:
            raise TornDataSet("encapsulated Pixel Data has no Basic Offset Table")
        frames = self._frames()
        if self._fragments == 0:
            raise TornDataSet("encapsulated Pixel Data has no fragment")
        if offsets:
            if len(offsets) != frames:
                raise TornDataSet(f"Basic Offset Table has {len(offsets)} offsets for {frames} frames")
            starts = set(self._fragment_starts)
            if offsets[0] != 0 or any(o not in starts for o in offsets) or offsets != sorted(set(offsets)):
                raise TornDataSet("Basic Offset Table does not point at fragments")
        elif self._fragments < frames:
            raise TornDataSet(f"{self._fragments} Pixel Data fragment(s) for {frames} frames")

    def _frames(self) -> int:
        try:
            frames = int(self.attributes.get("NumberOfFrames") or 1)
        except ValueError:
            raise TornDataSet("NumberOfFrames is not a number") from None
        if frames < 1:
            raise TornDataSet("NumberOfFrames is not positive")
        return frames

    def _native_pixels(self, length: int) -> None:
        missing = [k for k in ("Rows", "Columns", "BitsAllocated") if k not in self.numbers]
        if missing:
            raise TornDataSet(f"Pixel Data without {missing[0]}")
        samples = self.numbers.get("SamplesPerPixel", 1)
        if self.attributes.get("PhotometricInterpretation") == "YBR_FULL_422" and samples == 3:
            samples = 2  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
        bits = (self.numbers["Rows"] * self.numbers["Columns"] * samples * self._frames()
                * self.numbers["BitsAllocated"])
        expected = (bits + 7) // 8
        expected += expected % 2
        if length != expected:
            raise TornDataSet(f"Pixel Data has {length} bytes, image needs {expected}")

    def _capture(self, tag: int, raw: bytes) -> None:
        if tag in US_WANTED:
            if len(raw) >= 2:
                self.numbers[US_WANTED[tag]] = struct.unpack(self._e + "H", raw[:2])[0]
            return
        try:
            self.attributes[WANTED[tag]] = raw.rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
        except UnicodeDecodeError:
            self.attributes[WANTED[tag]] = ""

    # ------------------------------------------------------------------ verdict
    def finish(self) -> str | None:
        """None when the data set is whole; otherwise what is wrong with it."""
        if self.problem is not None:
            return self.problem
        if self._inflater is not None and not self._inflater.eof:
            return "deflated data set is cut short"
        if self._skip:
            if self._last_tag == ITEM:
                return "data set ends inside a Pixel Data fragment"
            return f"data set ends inside element {_tag(self._last_tag)}"
        if self._tail:
            return "data set ends inside an element header"
        if len(self._stack) > 1:
            kind = self._stack[-1][0]
            if kind == _FRAGMENTS:
                return "encapsulated Pixel Data has no sequence delimiter"
            return "data set ends inside an open sequence or item"
        return None
