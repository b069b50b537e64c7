"""Bearer-token authentication: JWT RS256 (keys from a JWKS file) and, for development, HS256.

What is refused: a missing or malformed token, ``alg: none`` or any algorithm other than RS256 (and
HS256 when allowed), an RS256 token whose ``kid`` is not in the JWKS, key confusion (an HS256 token is
only ever checked against the HS256 secret, never against an RSA public key), a wrong ``iss`` or
``aud``, a token past ``exp`` or before ``nbf`` (with a small clock skew), and a tenant claim that is not
a valid tenant name. The tenant comes from the token only, never from the request.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import RSAAlgorithm

from gateway.problems import Problem

SCOPES = ("detect:write", "results:read", "admin")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    subject: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        # admin implies every scope
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Problem("INSUFFICIENT_SCOPE", f"this call needs the scope {scope!r}",
                          headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})


def _invalid(detail: str) -> Problem:
    return Problem("INVALID_TOKEN", detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class Authenticator:
    def __init__(self, *, jwks: dict[str, Any] | None, hs256_secret: bytes | None, issuer: str, audience: str,
                 tenant_claim: str = "tenant", leeway_s: int = 30):
        self._rsa: dict[str | None, Any] = {}
        for jwk in (jwks or {}).get("keys", []):
            if jwk.get("kty") == "RSA" and jwk.get("use", "sig") == "sig":
                self._rsa[jwk.get("kid")] = RSAAlgorithm.from_jwk(json.dumps(jwk))
        if hs256_secret is not None and len(hs256_secret) < 32:
            raise ValueError("the HS256 secret must have at least 32 bytes")
        self._hs = hs256_secret
        self.issuer = issuer
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.leeway = leeway_s

    @classmethod
    def from_files(cls, *, jwks_file: Path | None, hs256_secret_file: Path | None, allow_hs256: bool,
                   issuer: str, audience: str, tenant_claim: str, leeway_s: int) -> Authenticator:
        jwks = json.loads(jwks_file.read_text()) if jwks_file is not None and jwks_file.exists() else None
        hs = (hs256_secret_file.read_bytes().strip()
              if allow_hs256 and hs256_secret_file is not None and hs256_secret_file.exists() else None)
        return cls(jwks=jwks, hs256_secret=hs, issuer=issuer, audience=audience, tenant_claim=tenant_claim,
                   leeway_s=leeway_s)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Problem("UNAUTHENTICATED", "send Authorization: Bearer <token>",
                          headers={"WWW-Authenticate": 'Bearer realm="detectflow"'})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem("UNAUTHENTICATED", "the Authorization header must use the Bearer scheme",
                          headers={"WWW-Authenticate": 'Bearer realm="detectflow"'})
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _invalid("malformed token") from exc
        alg = header.get("alg")
        if alg == "RS256":
            kid = header.get("kid")
            key = self._rsa.get(kid) if kid is not None or len(self._rsa) != 1 else next(iter(self._rsa.values()))
            if key is None:
                raise _invalid("unknown signing key")
        elif alg == "HS256" and self._hs is not None:
            key = self._hs
        else:
            raise _invalid(f"algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError as exc:
            raise _invalid("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _invalid("token not yet valid") from exc
        except jwt.PyJWTError as exc:
            raise _invalid(f"token rejected: {type(exc).__name__}") from exc
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise _invalid(f"the {self.tenant_claim!r} claim is missing or not a valid tenant name")
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = raw.split() if isinstance(raw, str) else [str(s) for s in raw] if isinstance(raw, list) else []
        return Principal(tenant=tenant, subject=str(claims["sub"]), scopes=frozenset(scopes))


# ---------------------------------------------------------------------------------- dev keys, minting


@dataclass(frozen=True)
class DevKeys:
    """Development signing keys under the state dir's secrets/ (0600): an RSA key + its JWKS, an HS256 secret."""

    private_key_file: Path
    jwks_file: Path
    hs256_secret_file: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_dev_keys(secrets_dir: Path) -> DevKeys:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = DevKeys(secrets_dir / "jwt-rs256.pem", secrets_dir / "jwks.json", secrets_dir / "jwt-hs256.key")
    if not keys.private_key_file.exists():
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(keys.private_key_file, private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    if not keys.jwks_file.exists():
        private = serialization.load_pem_private_key(keys.private_key_file.read_bytes(), password=None)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))  # type: ignore[arg-type]
        jwk.update({"kid": "dev-" + uuid.uuid4().hex[:8], "use": "sig", "alg": "RS256"})
        keys.jwks_file.write_text(json.dumps({"keys": [jwk]}, indent=2))
    if not keys.hs256_secret_file.exists():
        _write_private(keys.hs256_secret_file, secrets.token_urlsafe(48).encode())
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
