"""How the CLI turns typed text into key and value bytes, and bytes back into text or JSON.

Keys and values are bytes; a command line, a terminal and JSON are text. The rules (also in
`kvstore get --help` and the README):

- Input (KEY, VALUE, --value, --prefix, --start, --end, --continuation): the text's UTF-8 bytes
  (bytes that are not UTF-8 in an argument, e.g. from `$'\\xff'`, arrive unchanged), or with
  `--hex` hexadecimal (`6b6579` is b"key"). A value from stdin (`-`) or `--file` is read raw,
  whatever `--hex` says.
- Plain output: the bytes as they are (with `--hex`: hexadecimal), one record per line.
- JSON output: a byte-string field F (key, value, continuation) is `"F": "<text>"` when its bytes
  decode as UTF-8 (strictly), else `"F_b64": "<standard base64>"`, never both; with `--hex` it is
  always `"F_hex": "<lowercase hex>"`. `json_bytes` reads any of the three back.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

ENCODING_HELP = """\
bytes: KEY and VALUE arguments are UTF-8 text, or hexadecimal with --hex (6b6579 = "key");
  a value from stdin (-) or --file is read raw, whatever --hex says.
  plain output: the bytes as they are (--hex: hexadecimal); notes go to stderr.
  --json: a key/value/continuation field F is "F": text when its bytes are valid UTF-8,
  else "F_b64": base64 (never both); with --hex always "F_hex": hexadecimal."""


class UsageError(ValueError):
    """The command line is wrong (exit 2): bad hex, two value sources, no cluster named, ..."""


def parse_bytes(text: str, hex_mode: bool, what: str) -> bytes:
    """The bytes an argument names: hexadecimal under --hex, else the text's own bytes."""
    if hex_mode:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise UsageError(f"{what} {text!r} is not hexadecimal (--hex: two digits per byte)") from None
    # On POSIX, Python decodes argv with surrogateescape: this gives back the bytes that were typed.
    return text.encode("utf-8", "surrogateescape")


def shown(data: bytes, hex_mode: bool) -> bytes:
    """Plain output: the bytes themselves, or their hexadecimal under --hex."""
    return data.hex().encode() if hex_mode else data


def json_fields(name: str, data: bytes, hex_mode: bool) -> dict[str, str]:
    """`name`'s bytes as one JSON field: text if they are UTF-8, else base64 (`name_b64`); under
    --hex always hexadecimal (`name_hex`)."""
    if hex_mode:
        return {f"{name}_hex": data.hex()}
    try:
        return {name: data.decode("utf-8", "strict")}
    except UnicodeDecodeError:
        return {f"{name}_b64": base64.b64encode(data).decode("ascii")}


def json_bytes(document: dict[str, Any], name: str) -> bytes | None:
    """The bytes a document carries under `name` in any of the three forms (None: absent or null)."""
    if document.get(name) is not None:
        return str(document[name]).encode("utf-8")
    if document.get(f"{name}_b64") is not None:
        return base64.b64decode(document[f"{name}_b64"], validate=True)
    if document.get(f"{name}_hex") is not None:
        return binascii.unhexlify(document[f"{name}_hex"])
    return None


def display(data: bytes, hex_mode: bool) -> str:
    """A key in a note on stderr: its text, or its hexadecimal under --hex or when it is not UTF-8."""
    if hex_mode:
        return data.hex()
    try:
        return data.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return f"{data.hex()} (hex)"
