"""The project's certificate authority and each service's TLS certificate, made by `stack up`.

Everything lives in ``<secrets>/tls`` (directory 0700, keys 0600, never logged):

    ca.crt, ca.key                      the project CA (RSA 3072, 10 years)
    <name>.crt, <name>.key              a leaf: the certificate (leaf + CA chain) and its PKCS#8 key (RSA 2048)
    <name>.pem                          key + chain in one file (for servers that want one PEM keystore)

Server certificates carry SANs for 127.0.0.1 and localhost (plus any names asked for); client certificates
(Kafka's inter-broker and admin principals) carry their principal in the CN. A leaf is re-issued when it is
missing, within ``RENEW_BEFORE`` of its end, or signed by another CA; `detectflow certs rotate` re-issues
every leaf (and, with ``--ca``, the CA too) without touching any data. Clients verify against ``ca.crt``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from config import write_private

CA_DAYS = 3650
LEAF_DAYS = 397  # the longest a browser accepts; renewed a month before its end
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class Leaf:
    name: str
    cert: Path  # leaf + CA, PEM
    key: Path  # PKCS#8, PEM, unencrypted, 0600
    bundle: Path  # key + leaf + CA, PEM, 0600


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def leaf(self, name: str) -> Leaf:
        return Leaf(name, self.dir / f"{name}.crt", self.dir / f"{name}.key", self.dir / f"{name}.pem")


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ensure_ca(pki: Pki, *, force: bool = False) -> None:
    pki.dir.mkdir(parents=True, exist_ok=True)
    pki.dir.chmod(0o700)
    if pki.ca_cert.exists() and pki.ca_key.exists() and not force:
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        if cert.not_valid_after_utc - _now() > RENEW_BEFORE:
            return
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "detectflow"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"detectflow local CA {_now():%Y-%m-%d}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(pki.ca_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    _write_public(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _needs_leaf(pki: Pki, leaf: Leaf, sans: Sequence[str]) -> bool:
    if not (leaf.cert.exists() and leaf.key.exists() and leaf.bundle.exists()):
        return True
    try:
        cert = x509.load_pem_x509_certificate(leaf.cert.read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    except (ValueError, TypeError, InvalidSignature):
        return True  # unreadable, or signed by an earlier CA: issue it again
    return cert.not_valid_after_utc - _now() < RENEW_BEFORE or not set(sans) <= set(_san_strings(cert))


def _san_strings(cert: object) -> Iterable[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in ext.value.get_values_for_type(x509.IPAddress)]


def issue(pki: Pki, name: str, *, sans: Sequence[str] = ("localhost", "127.0.0.1"), server: bool = True,
          client: bool = False, common_name: str | None = None, force: bool = False) -> Leaf:
    """The leaf ``name`` (made or renewed as needed); ``common_name`` is the principal of a client cert."""
    ensure_ca(pki)
    leaf = pki.leaf(name)
    if not force and not _needs_leaf(pki, leaf, sans):
        return leaf
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alt: list[x509.GeneralName] = []
    for san in sans:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt.append(x509.DNSName(san))
    usages = [*([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
              *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "detectflow"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                              critical=False))
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain = cert.public_bytes(serialization.Encoding.PEM) + pki.ca_cert.read_bytes()
    write_private(leaf.key, key_pem)
    write_private(leaf.bundle, key_pem + chain)
    _write_public(leaf.cert, chain)
    return leaf


def rotate(pki: Pki, *, new_ca: bool = False) -> list[str]:
    """Issue every leaf again (same names, principals and SANs), after a new CA if ``new_ca``; returns the
    leaves. Services read their certificates at start: restart the stack afterwards."""
    if new_ca:
        ensure_ca(pki, force=True)
    rotated = []
    for cert_file in sorted(pki.dir.glob("*.crt")):
        if cert_file == pki.ca_cert:
            continue
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        issue(pki, cert_file.stem, sans=list(_san_strings(cert)), force=True,
              server=ExtendedKeyUsageOID.SERVER_AUTH in usages, client=ExtendedKeyUsageOID.CLIENT_AUTH in usages,
              common_name=str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value))
        rotated.append(cert_file.stem)
    return rotated
