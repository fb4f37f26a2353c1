"""SIGHUP re-reads the federation certificate, key and CA: a new CA rolled out as a
bundle, then a peer's new certificate from it, with relays flowing both ways."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from qpq_server.devserver import await_until
from qpq_server.federation.certs import init_ca, issue_cert, load_certificates
from tests.federation.conftest import Site
from tests.federation.test_relay import inbox, register, send_raw


async def test_certificates_from_a_new_ca_are_picked_up_on_sighup(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = sites
    bob = await register(b, tmp_path, "bob")
    alice = await register(a, tmp_path, "alice")
    await send_raw(a, alice, "bob@b.example", [b"before"])
    assert await inbox(b, bob, 1) == [("alice@a.example", b"before")]

    ca_file = tmp_path / "ca" / "federation-ca.der"
    init_ca(tmp_path / "ca2")
    bundle = load_certificates(ca_file) + load_certificates(
        tmp_path / "ca2" / "federation-ca.der")
    ca_file.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in bundle))
    a.running.reload()
    b.running.reload()
    issue_cert(tmp_path / "ca2", "b.example", tmp_path / "new-b")
    for name in ("federation-cert.der", "federation-key.der"):
        shutil.copy(tmp_path / "new-b" / name, tmp_path / "certs-b.example" / name)
    b.running.reload()

    await send_raw(a, alice, "bob@b.example", [b"after"])
    assert await inbox(b, bob, 1) == [("alice@a.example", b"after")]
    await send_raw(b, bob, "alice@a.example", [b"back"])
    assert await inbox(a, alice, 1) == [("bob@b.example", b"back")]
    assert a.running.metric("qpq_federation_refused_total", reason="other_ca") == 0

    (tmp_path / "certs-b.example" / "federation-cert.der").write_bytes(b"garbage")
    before = b.running.reloads()
    b.running.signal(signal.SIGHUP)
    await await_until(lambda: b.running.reloads()[1] == before[1] + 1, 10, "a failed reload")
    await send_raw(b, bob, "alice@a.example", [b"still"])  # the old certificate is kept
    assert await inbox(a, alice, 1) == [("bob@b.example", b"still")]
