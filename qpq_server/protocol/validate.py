"""Typed field access for request maps: every wrong type or size is a BadRequest."""

from __future__ import annotations

import re
from typing import Any

from qpq_server.errors import BadRequest, TooLarge

__all__ = ["USERNAME_RE", "USERNAME_RULE", "get_bytes", "get_bytes_list", "get_float", "get_int",
           "get_int_list", "get_optional_bytes", "get_str", "get_str_list", "get_username"]

USERNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # \Z: `$` would let "name\n" in
USERNAME_RULE = "1 to 64 characters from A-Z a-z 0-9 . _ -"
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}@[A-Za-z0-9.-]{1,253}\Z")


def _get(req: dict[str, Any], name: str, required: bool) -> Any:
    if name not in req or req[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return None
    return req[name]


def get_str(req: dict[str, Any], name: str, *, max_len: int = 4096) -> str:
    value = _get(req, name, True)
    if not isinstance(value, str):
        raise BadRequest(f"field {name!r} must be a string")
    if len(value) > max_len:
        raise TooLarge(f"field {name!r} longer than {max_len}")
    return value


def get_username(req: dict[str, Any], name: str = "username") -> str:
    value = get_str(req, name, max_len=64)
    if not USERNAME_RE.match(value):
        raise BadRequest(f"field {name!r} must be {USERNAME_RULE}")
    return value


def get_bytes(req: dict[str, Any], name: str, *, max_len: int, min_len: int = 0) -> bytes:
    value = _get(req, name, True)
    if not isinstance(value, bytes):
        raise BadRequest(f"field {name!r} must be bytes")
    if len(value) > max_len:
        raise TooLarge(f"field {name!r} larger than {max_len} bytes")
    if len(value) < min_len:
        raise BadRequest(f"field {name!r} shorter than {min_len} bytes")
    return value


def get_optional_bytes(req: dict[str, Any], name: str, *, max_len: int,
                       min_len: int = 0) -> bytes | None:
    """Like get_bytes, but an absent or nil field is None."""
    if req.get(name) is None:
        return None
    return get_bytes(req, name, max_len=max_len, min_len=min_len)


def get_int(req: dict[str, Any], name: str, *, lo: int, hi: int, default: int | None = None) -> int:
    value = _get(req, name, default is None)
    if value is None:
        assert default is not None
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be an integer")
    if not lo <= value <= hi:
        raise BadRequest(f"field {name!r} must be between {lo} and {hi}")
    return value


def get_float(req: dict[str, Any], name: str, *, lo: float, hi: float,
              default: float) -> float:
    value = _get(req, name, False)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a number")
    if not lo <= value <= hi:
        raise BadRequest(f"field {name!r} must be between {lo} and {hi}")
    return float(value)


def _get_list(req: dict[str, Any], name: str, max_items: int) -> list[Any]:
    value = _get(req, name, True)
    if not isinstance(value, list):
        raise BadRequest(f"field {name!r} must be a list")
    if len(value) > max_items:
        raise TooLarge(f"field {name!r} has more than {max_items} items")
    return value


def get_str_list(req: dict[str, Any], name: str, *, max_items: int,
                 addresses: bool = False) -> list[str]:
    """Usernames; with `addresses` also USER@DOMAIN (split and checked by the caller)."""
    items = _get_list(req, name, max_items)
    for item in items:
        if not isinstance(item, str) or not (
                USERNAME_RE.match(item) or (addresses and _ADDRESS_RE.match(item))):
            raise BadRequest(f"every item of {name!r} must be a username"
                             + (" or USER@DOMAIN" if addresses else ""))
    return items


def get_bytes_list(req: dict[str, Any], name: str, *, max_items: int,
                   max_len: int) -> list[bytes]:
    items = _get_list(req, name, max_items)
    for item in items:
        if not isinstance(item, bytes):
            raise BadRequest(f"every item of {name!r} must be bytes")
        if len(item) > max_len:
            raise TooLarge(f"an item of {name!r} is larger than {max_len} bytes")
    return items


def get_int_list(req: dict[str, Any], name: str, *, max_items: int) -> list[int]:
    items = _get_list(req, name, max_items)
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise BadRequest(f"every item of {name!r} must be a non-negative integer")
    return items
