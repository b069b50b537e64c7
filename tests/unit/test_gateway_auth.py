"""JWT verification: what is accepted and what is refused (no services)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest

from gateway.auth import Authenticator, DevKeys, ensure_dev_keys, mint
from gateway.problems import Problem


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> DevKeys:
    return ensure_dev_keys(tmp_path_factory.mktemp("secrets"))


def authenticator(keys: DevKeys, *, hs256: bool = True) -> Authenticator:
    return Authenticator.from_files(jwks_file=keys.jwks_file, hs256_secret_file=keys.hs256_secret_file,
                                    allow_hs256=hs256, issuer="detectflow", audience="detectflow-api",
                                    tenant_claim="tenant", leeway_s=30)


def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(Problem) as info:
        auth.verify(token)
    assert info.value.status == 401
    return info.value.detail


def test_dev_keys_are_private_and_stable(keys: DevKeys, tmp_path: Path) -> None:
    assert keys.private_key_file.stat().st_mode & 0o077 == 0
    assert keys.hs256_secret_file.stat().st_mode & 0o077 == 0
    jwks = keys.jwks_file.read_text()
    assert ensure_dev_keys(keys.private_key_file.parent).jwks_file.read_text() == jwks
    assert "\"d\"" not in jwks  # public parts only


def test_valid_rs256_and_hs256_tokens_give_the_principal(keys: DevKeys) -> None:
    auth = authenticator(keys)
    for alg in ("RS256", "HS256"):
        p = auth.authenticate("Bearer " + mint(keys, tenant="acme", scopes=["detect:write"], algorithm=alg))
        assert (p.tenant, p.subject, p.scopes) == ("acme", "dev:acme", frozenset({"detect:write"}))
        p.require("detect:write")
        with pytest.raises(Problem) as info:
            p.require("results:read")
        assert info.value.status == 403
    admin = auth.verify(mint(keys, tenant="acme", scopes=["admin"]))
    admin.require("results:read")  # admin implies every scope


def test_refusals(keys: DevKeys, tmp_path: Path) -> None:
    auth = authenticator(keys)
    now = time.time()
    assert "expired" in refused(auth, mint(keys, tenant="a", scopes=[], ttl_s=-60))
    assert "not yet valid" in refused(auth, mint(keys, tenant="a", scopes=[], now=now + 3600))
    refused(auth, mint(keys, tenant="a", scopes=[], audience="other"))
    refused(auth, mint(keys, tenant="a", scopes=[], issuer="other"))
    claims = {"iss": "detectflow", "aud": "detectflow-api", "sub": "s", "tenant": "a", "exp": int(now) + 60}
    assert "none" in refused(auth, jwt.encode(claims, None, algorithm="none"))
    other = ensure_dev_keys(tmp_path / "other")
    kid = json.loads(keys.jwks_file.read_text())["keys"][0]["kid"]
    refused(auth, jwt.encode(claims, other.private_key_file.read_bytes(), algorithm="RS256", headers={"kid": kid}))
    assert "unknown signing key" in refused(auth, mint(other, tenant="a", scopes=[]))
    # Key confusion: an HS256 token whose HMAC key is the RSA public key (PEM and JWK forms).
    for public in (keys.jwks_file.read_bytes(), _public_pem(keys)):
        head = jwt.utils.base64url_encode(b'{"alg":"HS256"}').decode()
        body = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
        sig = jwt.utils.base64url_encode(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
        refused(auth, f"{head}.{body}.{sig.decode()}")
    # HS256 is refused outright when it is not allowed.
    assert "HS256" in refused(authenticator(keys, hs256=False), mint(keys, tenant="a", scopes=[], algorithm="HS256"))
    refused(auth, mint(keys, tenant="a", scopes=[], extra={"tenant": "../etc"}))
    refused(auth, "abc")
    with pytest.raises(Problem) as info:
        auth.authenticate("Basic dXNlcjpwYXNz")
    assert info.value.code == "UNAUTHENTICATED"


def _public_pem(keys: DevKeys) -> bytes:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(keys.private_key_file.read_bytes(), None)
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
