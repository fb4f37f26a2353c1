"""Names from the network match their pattern in full: `$` with `re.match` also accepts a
trailing newline, which would make `alice\n` an account (or a peer address) of its own
beside `alice`, and a blob id with a newline a file name no listing expects."""

from __future__ import annotations

import pytest

from qpq_server.errors import BadRequest
from qpq_server.federation.address import split_address
from qpq_server.protocol.validate import get_str_list, get_username


@pytest.mark.parametrize("name", ["alice\n", "alice\r\n", "\nalice", "ali ce", ""])
def test_a_username_with_a_newline_or_space_is_refused(name: str) -> None:
    with pytest.raises(BadRequest):
        get_username({"username": name})


def test_a_plain_username_is_accepted() -> None:
    assert get_username({"username": "alice.b-c_1"}) == "alice.b-c_1"


@pytest.mark.parametrize("item", ["bob\n", "bob@example.org\n"])
def test_a_recipient_with_a_trailing_newline_is_refused(item: str) -> None:
    with pytest.raises(BadRequest):
        get_str_list({"to": [item]}, "to", max_items=4, addresses=True)


@pytest.mark.parametrize("address", ["bob\n@example.org", "bob@example.org\n"])
def test_a_federated_address_with_a_newline_is_refused(address: str) -> None:
    with pytest.raises(BadRequest):
        split_address(address, "own.example")
