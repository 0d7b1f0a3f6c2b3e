"""Decode the text files users hand us (recipes, data) as UTF-8, and say where and why when they are not.

Python's own `UnicodeDecodeError` names neither the line nor what the file probably is; a user who saved a
recipe from an editor in latin-1 or UTF-16 needs both to fix it. Nothing here imports torch or transformers.
"""

import codecs


class NotUtf8Text(ValueError):
    """The bytes are not UTF-8 text. `str(err)` says where (line, byte offset) and what they look like instead."""


def decode_utf8(data: bytes) -> str:
    """`data` as text; a leading UTF-8 byte-order mark is dropped (some Windows editors write one).

    Raises:
        NotUtf8Text: an invalid UTF-8 sequence or a NUL byte (UTF-16 text and binary files have them).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + len(data) - len(err.object)  # the utf-8-sig codec counts from after the BOM
        raise NotUtf8Text(
            f"not UTF-8 text: byte 0x{data[offset]:02x} at line {_line_of(data, offset)} "
            f"(byte offset {offset}) cannot be decoded; {_looks_like(data)}"
        ) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise NotUtf8Text(
            f"not UTF-8 text: NUL byte at line {_line_of(data, nul)} (byte offset {nul}); {_looks_like(data)}"
        )
    return text


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _looks_like(data: bytes) -> str:
    """A guess at what the bytes are, so the message says which conversion the user needs."""
    save = "save it as UTF-8 (in most editors: Save with Encoding, UTF-8)"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return f"it starts with a UTF-16 byte-order mark, so it is UTF-16: {save}"
    head = data[:512]
    # ASCII text in UTF-16 has a NUL in every other byte.
    if len(head) >= 4 and max(head[0::2].count(0), head[1::2].count(0)) >= len(head) // 4:
        return f"it looks like UTF-16: {save}"
    controls = sum(b < 9 or 13 < b < 32 for b in head)
    if controls > len(head) // 20:
        return "it looks like a binary file, not text"
    return f"it looks like a legacy 8-bit encoding such as latin-1 or cp1252: {save}"
