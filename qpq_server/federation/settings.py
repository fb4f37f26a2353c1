"""The `[federation]` section made usable: certificates and keys loaded, peers indexed,
configured peer addresses resolved to the source addresses they may connect from."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qpq_server.config import Config, parse_hostport
from qpq_server.errors import ConfigError
from qpq_server.federation.certs import certificate_domain, load_certificates, load_private_key

__all__ = ["FederationSettings", "Peer", "load_settings"]


@dataclass(frozen=True)
class Peer:
    domain: str
    address: str  # HOST:PORT of its federation listener ("" = it only connects to us)
    sources: frozenset[str]  # IPs it may connect from (empty: any)


@dataclass(frozen=True)
class FederationSettings:
    domain: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cas: list[x509.Certificate]
    peers: dict[str, Peer]
    # relaying and delivery knobs
    relay_max_age_s: float
    retry_base_s: float
    retry_max_s: float
    remember_relays_s: float

    @property
    def ca_pem(self) -> bytes:
        return b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in self.cas)


def _sources(address: str) -> frozenset[str]:
    if not address:
        return frozenset()
    host, port = parse_hostport(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigError(f"[[federation.peers]] address {address!r}: cannot resolve "
                          f"{host}: {exc.strerror}") from None
    return frozenset(str(info[4][0]) for info in infos)


def load_settings(config: Config) -> FederationSettings:
    fed = config.federation
    domain = (fed.domain or config.server.domain).lower()
    certificate = load_certificates(config.path(fed.federation_cert))[0]
    if certificate_domain(certificate) != domain:
        raise ConfigError(f"[federation] federation_cert is for "
                          f"{certificate_domain(certificate)!r}, not this server's federation "
                          f"domain {domain!r}")
    key = load_private_key(config.path(fed.federation_key))
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) \
            or key.public_key().public_numbers() != public.public_numbers():
        raise ConfigError("[federation] federation_key does not match federation_cert")
    peers = {p.domain.lower(): Peer(p.domain.lower(), p.address, _sources(p.address))
             for p in fed.peers}
    return FederationSettings(
        domain=domain, certificate=certificate, key=key,
        cas=load_certificates(config.path(fed.federation_ca)), peers=peers,
        relay_max_age_s=fed.relay_max_age_s, retry_base_s=fed.retry_base_s,
        retry_max_s=fed.retry_max_s, remember_relays_s=fed.remember_relays_s)
