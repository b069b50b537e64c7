"""Development signing keys and tokens, for the dev mode only (DETECTFLOW_AUTH_DEV=true, docs/security.md).

The keys live in the state dir's secrets/ (0600): an RSA key + its public JWKS, and an HS256 secret.
Nothing here runs unless dev mode is on: `detectflow token` and `detectflow run gateway` refuse to
create or use them otherwise, so a deployment never trusts a key that was made on the machine.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from config import write_private
from gateway.auth import SCOPES, TENANT_RE


@dataclass(frozen=True)
class DevKeys:
    """Development signing keys under the state dir's secrets/ (0600): an RSA key + its JWKS, an HS256 secret."""

    private_key_file: Path
    jwks_file: Path
    hs256_secret_file: Path


def ensure_dev_keys(secrets_dir: Path) -> DevKeys:
    keys = DevKeys(secrets_dir / "jwt-rs256.pem", secrets_dir / "jwks.json", secrets_dir / "jwt-hs256.key")
    if not keys.private_key_file.exists():
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_private(keys.private_key_file, private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    if not keys.jwks_file.exists():
        private = serialization.load_pem_private_key(keys.private_key_file.read_bytes(), password=None)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))  # type: ignore[arg-type]
        jwk.update({"kid": "dev-" + uuid.uuid4().hex[:8], "use": "sig", "alg": "RS256"})
        keys.jwks_file.write_text(json.dumps({"keys": [jwk]}, indent=2))
    if not keys.hs256_secret_file.exists():
        write_private(keys.hs256_secret_file, secrets.token_urlsafe(48).encode())
    return keys


def mint(keys: DevKeys, *, tenant: str, scopes: Iterable[str], subject: str | None = None, ttl_s: int = 3600,
         issuer: str = "detectflow", audience: str = "detectflow-api", algorithm: str = "RS256",
         tenant_claim: str = "tenant", now: float | None = None, extra: dict[str, Any] | None = None) -> str:
    """A signed development token (RS256 with the dev RSA key, or HS256 with the dev secret)."""
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}")
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {', '.join(SCOPES)}")
    now = time.time() if now is None else now
    claims = {"iss": issuer, "aud": audience, "sub": subject or f"dev:{tenant}", tenant_claim: tenant,
              "scope": " ".join(scopes), "iat": int(now), "nbf": int(now), "exp": int(now + ttl_s),
              "jti": uuid.uuid4().hex, **(extra or {})}
    if algorithm == "RS256":
        kid = json.loads(keys.jwks_file.read_text())["keys"][0]["kid"]
        return jwt.encode(claims, keys.private_key_file.read_bytes(), algorithm="RS256", headers={"kid": kid})
    if algorithm == "HS256":
        return jwt.encode(claims, keys.hs256_secret_file.read_bytes().strip(), algorithm="HS256")
    raise ValueError(f"unsupported algorithm {algorithm}")
