"""`qpq-server federation init-ca / issue-cert` and what `check-config` says about a
[federation] section and its files."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w
from cryptography import x509

from qpq_server.federation.certs import init_ca, issue_cert
from tests.federation.conftest import make_sites, qpq_server


def test_init_ca_and_issue_cert_write_der_files_with_private_keys_0600(
        tmp_path: Path) -> None:
    made = qpq_server("federation", "init-ca", "--out", str(tmp_path / "ca"))
    assert made.returncode == 0, made.stderr
    issued = qpq_server("federation", "issue-cert", "--ca", str(tmp_path / "ca"),
                        "--domain", "a.example", "--out", str(tmp_path / "a"))
    assert issued.returncode == 0, issued.stderr
    assert "federation-cert.der" in issued.stdout and "federation-key.der" in issued.stdout
    for key in (tmp_path / "ca" / "federation-ca-key.der", tmp_path / "a" / "federation-key.der"):
        assert key.stat().st_mode & 0o777 == 0o600
    ca = x509.load_der_x509_certificate((tmp_path / "ca" / "federation-ca.der").read_bytes())
    leaf = x509.load_der_x509_certificate((tmp_path / "a" / "federation-cert.der").read_bytes())
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]


def test_cert_tools_refuse_clearly(tmp_path: Path) -> None:
    assert qpq_server("federation", "init-ca", "--out", str(tmp_path / "ca")).returncode == 0
    again = qpq_server("federation", "init-ca", "--out", str(tmp_path / "ca"))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    no_ca = qpq_server("federation", "issue-cert", "--ca", str(tmp_path / "nope"),
                       "--domain", "a.example", "--out", str(tmp_path / "a"))
    assert no_ca.returncode == 1 and "no federation CA" in no_ca.stderr
    bad = qpq_server("federation", "issue-cert", "--ca", str(tmp_path / "ca"),
                     "--domain", "bob@a.example", "--out", str(tmp_path / "a"))
    assert bad.returncode == 1 and "is not a domain name" in bad.stderr
    ok = qpq_server("federation", "issue-cert", "--ca", str(tmp_path / "ca"),
                    "--domain", "a.example", "--out", str(tmp_path / "a"))
    assert ok.returncode == 0
    twice = qpq_server("federation", "issue-cert", "--ca", str(tmp_path / "ca"),
                       "--domain", "a.example", "--out", str(tmp_path / "a"))
    assert twice.returncode == 1 and "refusing to overwrite" in twice.stderr
    for out in (again, no_ca, bad, twice):
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "--domain" in qpq_server("federation", "issue-cert", "--help").stdout


def edit(config: Path, **federation: object) -> None:
    data = tomllib.loads(config.read_text())
    data["federation"].update(federation)
    config.write_text(tomli_w.dumps(data))


def check(config: Path) -> tuple[int, str]:
    done = qpq_server("check-config", str(config))
    return done.returncode, done.stderr


def test_check_config_accepts_a_federated_server_and_names_each_problem(
        tmp_path: Path) -> None:
    a, _ = make_sites(tmp_path)
    assert check(a.config_path) == (0, "")
    certs = tmp_path / "certs-a.example"

    init_ca(tmp_path / "other-ca")
    issue_cert(tmp_path / "other-ca", "a.example", tmp_path / "other")
    issue_cert(tmp_path / "ca", "c.example", tmp_path / "c")
    cases: list[tuple[dict[str, object], str]] = [
        ({"federation_cert": str(tmp_path / "missing.der")}, "file not found"),
        ({"federation_cert": str(tmp_path / "c" / "federation-cert.der"),
          "federation_key": str(tmp_path / "c" / "federation-key.der")},
         "is for 'c.example', not this server's federation domain 'a.example'"),
        ({"federation_key": str(tmp_path / "c" / "federation-key.der")},
         "federation_key does not match federation_cert"),
        ({"federation_cert": str(tmp_path / "other" / "federation-cert.der"),
          "federation_key": str(tmp_path / "other" / "federation-key.der")},
         "does not verify against federation_ca"),
        ({"federation_ca": str(certs / "federation-key.der")}, "is not an X.509 certificate"),
        ({"peers": [{"domain": "a.example", "address": "127.0.0.1:1"}]},
         "is this server's own domain"),
        ({"peers": [{"domain": "b.example", "address": "nowhere"}]}, "is not HOST:PORT"),
        ({"peers": [{"domain": "B_bad!", "address": ""}]}, "is not a domain name"),
        ({"retry_base_s": 10.0, "retry_max_s": 1.0}, "retry_base_s must be at most"),
        ({"relay_max_age_s": 100.0, "remember_relays_s": 50.0},
         "remember_relays_s must be longer than relay_max_age_s"),
        ({"peer_burst": 0}, "peer_burst must be > 0"),
    ]
    original = a.config_path.read_text()
    for change, expected in cases:
        a.config_path.write_text(original)
        edit(a.config_path, **change)
        code, stderr = check(a.config_path)
        assert code == 1 and expected in stderr, (change, stderr)
        assert "Traceback" not in stderr


def test_run_refuses_a_federation_section_that_does_not_fit_in_one_line(
        tmp_path: Path) -> None:
    a, _ = make_sites(tmp_path)
    issue_cert(tmp_path / "ca", "c.example", tmp_path / "c")
    edit(a.config_path, federation_cert=str(tmp_path / "c" / "federation-cert.der"))
    done = qpq_server("run", "--config", str(a.config_path))
    assert done.returncode == 1, done.stderr
    assert "federation_cert is for 'c.example'" in done.stderr
    assert "Traceback" not in done.stderr
