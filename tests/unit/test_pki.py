"""The project CA and the services' certificates (infra/stack/pki.py)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509

from infra.stack.pki import Pki, ensure_ca, issue, rotate


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_leaf_verifies_against_the_ca_with_its_sans_and_private_keys(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "tls")
    leaf = issue(pki, "kafka", client=True, common_name="kafka-broker")
    cert = _cert(leaf.cert)
    cert.verify_directly_issued_by(_cert(pki.ca_cert))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.subject.rfc4514_string() == "CN=kafka-broker,O=detectflow"
    for secret in (leaf.key, leaf.bundle, pki.ca_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700
    # A TLS client trusting the CA accepts the server's chain (load it the way a server would).
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(leaf.cert), str(leaf.key))


def test_issue_is_idempotent_and_renews_what_another_ca_signed(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "tls")
    first = issue(pki, "cassandra").cert.read_bytes()
    assert issue(pki, "cassandra").cert.read_bytes() == first  # nothing to do
    ensure_ca(pki, force=True)  # a new CA: the old leaf no longer verifies, so it is issued again
    again = issue(pki, "cassandra")
    assert again.cert.read_bytes() != first
    _cert(again.cert).verify_directly_issued_by(_cert(pki.ca_cert))


def test_rotate_keeps_names_principals_and_usages(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "tls")
    issue(pki, "admin", sans=(), server=False, client=True, common_name="admin")
    issue(pki, "minio")
    before = {p.stem: _cert(p) for p in pki.dir.glob("*.crt") if p != pki.ca_cert}
    assert sorted(rotate(pki, new_ca=True)) == ["admin", "minio"]
    for name, old in before.items():
        new = _cert(pki.leaf(name).cert)
        assert new.serial_number != old.serial_number and new.subject == old.subject
        assert new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
            old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        new.verify_directly_issued_by(_cert(pki.ca_cert))
