"""Sender-controlled text made safe to print: a message can neither drive the terminal
(ANSI/C0/C1 escape sequences) nor reorder what is shown (bidi overrides), nor fake a
line that seems to come from someone else (a newline followed by `[time] bob: ...`).

Such characters are shown escaped (`\\x1b`, `\\u202e`) rather than dropped, so the
reader sees that something was there. Newlines in a message body are kept but every
continuation line is indented, so only the client starts a line at the left margin.
"""

from __future__ import annotations

import unicodedata

__all__ = ["CONTINUATION", "is_unsafe", "safe_file_name", "safe_line", "safe_text"]

CONTINUATION = "    "  # indent of a message's second and later lines
_FILE_NAME_BYTES = 200  # below every common file system's 255-byte name limit
# Bidi embeddings/overrides/isolates and marks, and the Unicode line/paragraph breaks.
_INVISIBLE = frozenset({*range(0x202A, 0x202F), *range(0x2066, 0x206A),
                        0x200E, 0x200F, 0x061C, 0x2028, 0x2029})


def is_unsafe(ch: str) -> bool:
    """A control character (C0, DEL, C1) or a bidi/line-break format character."""
    return ord(ch) in _INVISIBLE or unicodedata.category(ch) == "Cc"


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_line(text: str) -> str:
    """One line: every unsafe character, newlines and tabs included, shown escaped."""
    return "".join(_escape(ch) if is_unsafe(ch) else ch for ch in text)


def safe_text(text: str) -> str:
    """A message body: newlines kept but indented (a tab stays a tab), the rest as
    `safe_line`. CRLF counts as a newline; a lone carriage return is escaped."""
    lines = text.replace("\r\n", "\n").split("\n")
    return ("\n" + CONTINUATION).join(
        "".join(ch if ch == "\t" or not is_unsafe(ch) else _escape(ch) for ch in line)
        for line in lines)


def safe_file_name(name: str) -> str:
    """A plain file name to save under: no directory part (`/`, `\\`), no leading dot
    (so neither `..` nor a hidden file), no NUL or other unsafe character (each becomes
    `_`), at most 200 bytes of UTF-8; "attachment" when nothing is left."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join("_" if is_unsafe(ch) else ch for ch in base).strip().lstrip(".")
    cleaned = cleaned.encode()[:_FILE_NAME_BYTES].decode(errors="ignore").strip()
    return cleaned or "attachment"
