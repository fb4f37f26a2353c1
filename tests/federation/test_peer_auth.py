"""Who may connect to the federation listener: only a configured peer, with a current
certificate from the federation CA naming that peer's domain, proving it holds the
certificate's key, from the peer's configured address. Each refusal is counted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from qpq_server.devserver import await_until
from qpq_server.federation.auth import auth_message, sign
from qpq_server.federation.certs import (
    CERT,
    KEY,
    init_ca,
    issue_cert,
    load_certificates,
    load_private_key,
)
from qpq_server.federation.link import LinkError, PeerLink, open_link
from tests.federation.conftest import Site, make_sites

HELLO_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Path]]:
    """b.example running (a.example's certificates exist, its server need not run)."""
    root = tmp_path_factory.mktemp("fedauth")
    # A silent connection is closed after hello_timeout_s: 3 s, not the default 5, so the
    # test that waits for it waits less (ample for a real peer's hello and auth here).
    _, b = make_sites(root, {"quic": {"hello_timeout_s": HELLO_TIMEOUT_S}})
    b.start()
    try:
        yield b, root
    finally:
        b.stop()


async def link_as(b: Site, root: Path, certs: Path, claim: str, *,
                  local_host: str | None = None) -> PeerLink:
    return await open_link(f"127.0.0.1:{b.fed_port}", "b.example", claim,
                           ca_pem=load_certificates(root / "ca" / "federation-ca.der")[0]
                           .public_bytes(Encoding.PEM),
                           certificate=load_certificates(certs / CERT)[0],
                           key=load_private_key(certs / KEY), timeout=5.0,
                           local_host=local_host)


def refused(b: Site, reason: str) -> float:
    return b.running.metric("qpq_federation_refused_total", reason=reason)


async def test_the_configured_peer_with_its_certificate_is_accepted(
        world: tuple[Site, Path]) -> None:
    b, root = world
    link = await link_as(b, root, root / "certs-a.example", "a.example")
    try:
        head = await link.call("kt", call="kt_head")
        assert "head" in head
        assert link.peer_certificate == load_certificates(
            root / "certs-b.example" / CERT)[0]
    finally:
        link.close()


@pytest.mark.parametrize("case", ["unknown_peer", "other_ca", "expired", "wrong_domain",
                                  "wrong_address"])
async def test_bad_peers_are_refused_and_counted(world: tuple[Site, Path], case: str,
                                                 tmp_path: Path) -> None:
    b, root = world
    ca = root / "ca"
    claim, local_host = "a.example", None
    if case == "unknown_peer":
        certs = issue_cert(ca, "c.example", tmp_path / "c")[0].parent
        claim = "c.example"
    elif case == "other_ca":
        init_ca(tmp_path / "other-ca")
        certs = issue_cert(tmp_path / "other-ca", "a.example", tmp_path / "o")[0].parent
    elif case == "expired":
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        certs = issue_cert(ca, "a.example", tmp_path / "e", days=1, not_before=past)[0].parent
    elif case == "wrong_domain":  # a CA-signed certificate, but for another domain
        certs = issue_cert(ca, "c.example", tmp_path / "w")[0].parent
    else:  # a.example's own certificate, from an address that is not a.example's
        certs, local_host = root / "certs-a.example", "127.0.0.2"
    before = refused(b, case)
    with pytest.raises(LinkError) as err:
        link = await link_as(b, root, certs, claim, local_host=local_host)
        link.close()
    assert err.value.code == "refused", err.value
    assert refused(b, case) == before + 1
    assert case in b.running.log()


async def test_the_listener_answers_hostile_input_and_closes_silent_connections(
        world: tuple[Site, Path]) -> None:
    b, root = world
    ca_pem = load_certificates(root / "ca" / "federation-ca.der")[0].public_bytes(
        Encoding.PEM)
    certs = root / "certs-a.example"
    link = await open_link(f"127.0.0.1:{b.fed_port}", "b.example", "a.example",
                           ca_pem=ca_pem, certificate=load_certificates(certs / CERT)[0],
                           key=load_private_key(certs / KEY), timeout=5.0,
                           authenticate=False)
    try:
        with pytest.raises(LinkError) as err:
            await link.call("relay", relays=[])
        assert err.value.code == "unauthenticated"
        with pytest.raises(LinkError) as err:
            await link.call("no_such_op")
        assert err.value.code == "bad_request"
        garbled = await link.send_raw(b"\x00\x00\x00\x03\xc1\xc1\xc1")
        assert garbled["error"]["code"] == "bad_frame"
        huge = await link.send_raw(b"\x7f\xff\xff\xff")
        assert huge["error"]["code"] == "too_large"
        hello = await link.call("fed_hello", domain="a.example")
        with pytest.raises(LinkError) as err:  # a signature over another challenge
            await link.call("fed_auth", domain="a.example",
                            certificate=load_certificates(certs / CERT)[0].public_bytes(
                                Encoding.DER),
                            signature=sign(load_private_key(certs / KEY),
                                           auth_message("b.example", "a.example",
                                                        bytes(32))))
        assert err.value.code == "refused" and hello["challenge"] != bytes(32)
    finally:
        link.close()
    # Connected but never authenticating: closed after [quic] hello_timeout_s.
    idle = await open_link(f"127.0.0.1:{b.fed_port}", "b.example", "a.example",
                           ca_pem=ca_pem, certificate=load_certificates(certs / CERT)[0],
                           key=load_private_key(certs / KEY), timeout=5.0,
                           authenticate=False)
    try:
        await await_until(lambda: not idle.alive, 15, "the silent connection closed")
    finally:
        idle.close()
    assert b.running.metric("qpq_federation_refused_total", reason="bad_signature") >= 1


async def test_the_connecting_side_refuses_a_listener_with_the_wrong_certificate(
        world: tuple[Site, Path], tmp_path: Path) -> None:
    """The other half of mutual authentication: the TLS handshake checks the listener's
    certificate against the federation CA and the peer's domain."""
    b, root = world
    certs = root / "certs-a.example"
    init_ca(tmp_path / "other-ca")
    other_ca = load_certificates(tmp_path / "other-ca" / "federation-ca.der")[0]
    right_ca = load_certificates(root / "ca" / "federation-ca.der")[0]
    for expected_domain, ca in (("c.example", right_ca), ("b.example", other_ca)):
        with pytest.raises(LinkError) as err:
            link = await open_link(f"127.0.0.1:{b.fed_port}", expected_domain, "a.example",
                                   ca_pem=ca.public_bytes(Encoding.PEM),
                                   certificate=load_certificates(certs / CERT)[0],
                                   key=load_private_key(certs / KEY), timeout=5.0)
            link.close()
        assert err.value.code == "unreachable"
        assert "certificate" in str(err.value).lower() or "hostname" in str(err.value), \
            err.value
