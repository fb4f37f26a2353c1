"""Pure parts of federation: retry delays, addresses, the signed challenge."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qpq_server.errors import BadRequest
from qpq_server.federation.address import split_address
from qpq_server.federation.auth import auth_message, sign, signature_valid
from qpq_server.federation.outbox import backoff_delay


def test_retry_delay_doubles_from_the_base_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(7)
    for failures, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (60, 30.0)):
        delays = [backoff_delay(failures, 1.0, 30.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not one fixed value


def test_addresses_split_into_user_and_other_domain() -> None:
    assert split_address("bob", "a.example") == ("bob", None)
    assert split_address("bob@a.example", "a.example") == ("bob", None)
    assert split_address("bob@B.Example", "a.example") == ("bob", "b.example")
    for bad in ("bob@", "@b.example", "b ob@b.example", "bob@b_example", "bob@-b.example"):
        with pytest.raises(BadRequest):
            split_address(bad, "a.example")


def test_a_challenge_signature_binds_both_domains_and_the_challenge() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    message = auth_message("b.example", "a.example", b"c" * 32)
    signature = sign(key, message)
    assert signature_valid(cert, signature, message)
    for other in (auth_message("x.example", "a.example", b"c" * 32),
                  auth_message("b.example", "x.example", b"c" * 32),
                  auth_message("b.example", "a.example", b"d" * 32)):
        assert not signature_valid(cert, signature, other)
