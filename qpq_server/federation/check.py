"""`check-config` for the federation files: beyond "the file exists", that they parse,
the certificate names this server's federation domain, the key is its key, it
verifies against the configured CA and is valid now, and peer addresses resolve."""

from __future__ import annotations

from qpq_server.config import Config
from qpq_server.errors import ConfigError
from qpq_server.federation.certs import Refusal, verify_peer_certificate
from qpq_server.federation.settings import load_settings

__all__ = ["federation_file_problems"]


def federation_file_problems(config: Config) -> list[str]:
    if not config.federation.enabled:
        return []
    try:
        settings = load_settings(config)
        verify_peer_certificate(settings.certificate, settings.cas)
    except ConfigError as exc:
        return [str(exc)]
    except Refusal as exc:
        return [f"[federation] federation_cert does not verify against federation_ca: {exc}"]
    return []
