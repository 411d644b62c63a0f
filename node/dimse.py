"""DIMSE command sets (PS3.7 6.3, 9.3, E.1): the few bytes before every data set, decoded and answered.

Kept apart from ``node.acceptor`` (the upper layer) so each stays small enough to read in one go.
Command sets are always implicit VR little endian and hold only group 0000 elements.
"""

from __future__ import annotations

import struct

# A-ABORT reasons (PS3.8 9.3.8)
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason



# DIMSE (PS3.7 9.3, E.1)
# DIMSE (PS3.7 9.3, E.1)
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATASET = 0x0101
UNRECOGNISED_OPERATION = 0x0211
TAG_AFFECTED_SOP_CLASS, TAG_COMMAND_FIELD, TAG_MESSAGE_ID = 0x00000002, 0x00000100, 0x00000110
TAG_MESSAGE_ID_RESPONDED, TAG_PRIORITY, TAG_DATASET_TYPE = 0x00000120, 0x00000700, 0x00000800
TAG_STATUS, TAG_ERROR_COMMENT, TAG_AFFECTED_SOP_INSTANCE = 0x00000900, 0x00000902, 0x00001000
_US_TAGS = {TAG_COMMAND_FIELD, TAG_MESSAGE_ID, TAG_MESSAGE_ID_RESPONDED, TAG_PRIORITY, TAG_DATASET_TYPE, TAG_STATUS}


def _answerable(command_field: int) -> bool:
    """A response (high bit set) or a C-CANCEL gets no answer of its own (PS3.7 9.3.2.3)."""
    return not command_field & 0x8000 and command_field != C_CANCEL_RQ


def decode_command(data: bytes) -> dict[int, int | str]:
    """Command sets are always implicit VR little endian (PS3.7 6.3.1)."""
    out: dict[int, int | str] = {}
    off, end = 0, len(data)
    while off < end:
        if off + 8 > end:
            raise ProtocolError("truncated command set")
        group, elem, length = struct.unpack_from("<HHI", data, off)
        off += 8
        if off + length > end:
            raise ProtocolError("command element runs past the command set")
        tag = (group << 16) | elem
        value = bytes(data[off:off + length])
        off += length
        if tag in _US_TAGS:
            if length != 2:
                raise ProtocolError(f"command element ({group:04X},{elem:04X}) is not US")
            out[tag] = struct.unpack("<H", value)[0]
        elif group == 0x0000 and tag != 0x00000000:
            out[tag] = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return out


def _element(tag: int, value: int | str, pad: bytes = b"\x00") -> bytes:
    if isinstance(value, int):
        raw = struct.pack("<H", value)
    else:
        raw = value.encode("ascii", "replace")
        if len(raw) % 2:
            raw += pad
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw


def encode_response(command_field: int, request: dict[int, int | str], status: int, comment: str = "") -> bytes:
    elems = [_element(TAG_AFFECTED_SOP_CLASS, str(request.get(TAG_AFFECTED_SOP_CLASS, ""))),
             _element(TAG_COMMAND_FIELD, command_field | 0x8000),
             _element(TAG_MESSAGE_ID_RESPONDED, int(request.get(TAG_MESSAGE_ID, 0))),
             _element(TAG_DATASET_TYPE, NO_DATASET),
             _element(TAG_STATUS, status)]
    if comment:
        elems.append(_element(TAG_ERROR_COMMENT, comment[:64], pad=b" "))
    if TAG_AFFECTED_SOP_INSTANCE in request:
        elems.append(_element(TAG_AFFECTED_SOP_INSTANCE, str(request[TAG_AFFECTED_SOP_INSTANCE])))
    body = b"".join(elems)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body

