"""Bearer-token authentication: RS256 JWTs verified with an OpenID provider's or a JWKS file's keys.

HS256 (a shared secret) is accepted only in the development mode. What is refused, each with 401
INVALID_TOKEN and a ``reason`` (docs/security.md): a malformed token, ``alg: none`` or any algorithm
other than RS256 (and HS256 in dev mode), an RS256 token whose ``kid`` is unknown even after the keys
were reloaded, key confusion (an HS256 token is only ever checked against the HS256 secret, never
against an RSA public key), a bad signature, a wrong ``iss`` or ``aud``, a missing ``exp``/``iat``/
``sub``, a token past ``exp``, before ``nbf``, issued in the future, or living longer than the maximum
lifetime (all with a small clock skew), and a tenant claim that is not a valid tenant name. The tenant
comes from the token only, never from the request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from config import GatewaySettings
from gateway.jwks import JsonFetcher, JwksFile, OidcJwks, SigningKeys
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


def _invalid(reason: str, detail: str) -> Problem:
    return Problem("INVALID_TOKEN", detail, reason=reason,
                   headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'})


# pyjwt's refusals -> (reason, detail); the first matching class wins (subclasses before their bases).
_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token not yet valid (nbf)"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token's issuer (iss) is not the one this gateway trusts"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token's audience (aud) does not include this API"),
    (jwt.MissingRequiredClaimError, "missing_claim", "a required claim is missing"),
    (jwt.InvalidSignatureError, "bad_signature", "the signature does not verify"),
)


class Authenticator:
    def __init__(self, *, keys: SigningKeys | None, hs256_secret: bytes | None, issuer: str, audience: str,
                 tenant_claim: str = "tenant", leeway_s: int = 30, max_lifetime_s: int = 24 * 3600,
                 clock: Callable[[], float] = time.time):
        if hs256_secret is not None and len(hs256_secret) < 32:
            raise ValueError("the HS256 secret must have at least 32 bytes")
        self.keys = keys
        self._hs = hs256_secret
        self.issuer = issuer
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.leeway = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Authenticator:
        """Loads the keys once (blocking; a failure stops the start: no keys, no gateway)."""
        settings.require_auth_source()
        reload = {"refresh_min_s": settings.jwks_refresh_min_s, "max_age_s": settings.jwks_max_age_s}
        keys: SigningKeys
        if settings.oidc_issuer is not None:
            fetcher = JsonFetcher(timeout_s=settings.idp_timeout_s, max_bytes=settings.idp_max_bytes,
                                  ca_bundle=settings.idp_ca_bundle)
            keys = OidcJwks(settings.oidc_issuer, fetcher, **reload)
        else:
            assert settings.jwks_file is not None  # require_auth_source
            keys = JwksFile(settings.jwks_file, max_bytes=settings.idp_max_bytes, **reload)
        keys.load()
        hs = None
        if settings.auth_dev and settings.allow_hs256 and settings.hs256_secret_file is not None:
            hs = _read_secret(settings.hs256_secret_file)
        return cls(keys=keys, hs256_secret=hs, issuer=settings.issuer, audience=settings.audience,
                   tenant_claim=settings.tenant_claim, leeway_s=settings.clock_skew_s,
                   max_lifetime_s=settings.max_token_lifetime_s)

    @staticmethod
    def bearer(authorization: str | None) -> str:
        if not authorization:
            raise Problem("UNAUTHENTICATED", "send Authorization: Bearer <token>",
                          headers={"WWW-Authenticate": 'Bearer realm="detectflow"'})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem("UNAUTHENTICATED", "the Authorization header must use the Bearer scheme",
                          headers={"WWW-Authenticate": 'Bearer realm="detectflow"'})
        return token.strip()

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller's principal; a key reload (network or disk) runs off the event loop."""
        token = self.bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            header = {}
        kid = header.get("kid")
        if header.get("alg") == "RS256" and self.keys is not None and self.keys.wants_reload(kid):
            return await asyncio.to_thread(self.verify, token)
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _invalid("malformed", "malformed token") from exc
        alg = header.get("alg")
        key: Any
        if alg == "RS256" and self.keys is not None:
            key = self.keys.key(header.get("kid"))
            if key is None:
                raise _invalid("unknown_key", f"unknown signing key (kid {header.get('kid')!r})")
        elif alg == "HS256" and self._hs is not None:
            key = self._hs
        else:
            raise _invalid("algorithm_not_accepted", f"algorithm {alg!r} is not accepted")
        try:
            # iat is checked below, the same way whatever pyjwt's version does with it.
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway, options={"require": ["exp", "iat", "iss", "aud", "sub"],
                                                             "verify_iat": False})
        except jwt.PyJWTError as exc:
            for cls, reason, detail in _REFUSALS:
                if isinstance(exc, cls):
                    raise _invalid(reason, f"{detail}: {exc}" if reason == "missing_claim" else detail) from exc
            raise _invalid("rejected", f"token rejected: {type(exc).__name__}") from exc
        self._check_lifetime(claims)
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise _invalid("invalid_tenant", f"the {self.tenant_claim!r} claim is missing or not a valid tenant name")
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = raw.split() if isinstance(raw, str) else [str(s) for s in raw] if isinstance(raw, list) else []
        return Principal(tenant=tenant, subject=str(claims["sub"]), scopes=frozenset(scopes))

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        iat, exp = claims["iat"], claims["exp"]
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise _invalid("malformed", "the iat claim is not a number")
        if iat > self._clock() + self.leeway:
            raise _invalid("issued_in_future", "the token was issued in the future (iat)")
        # A bound on exp - iat: a token minted to live for years would outlast every key rotation.
        if exp - iat > self.max_lifetime_s:
            raise _invalid("lifetime_too_long",
                           f"the token lives {int(exp - iat)}s (exp - iat); at most {self.max_lifetime_s}s")


def _read_secret(path: Path) -> bytes | None:
    return path.read_bytes().strip() if path.exists() else None
