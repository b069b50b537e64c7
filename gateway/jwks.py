"""Where the gateway's RS256 verification keys come from: a JWKS file, or an OpenID provider's JWKS.

Both sources cache the keys and load them again when a token names a ``kid`` they do not hold (the
provider rotated its keys) or when the cache is older than ``max_age_s`` (a key the provider withdrew
stops being accepted). Loads are rate-limited to one per ``refresh_min_s``: tokens with made-up kids
cost a dictionary lookup, not a request to the provider. A failed reload keeps the keys already held.

Every HTTP fetch has a deadline and a size bound, verifies TLS (a CA bundle may be named; the system
store otherwise), and refuses redirects, so a provider cannot send the gateway somewhere it was not
configured to go.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jwt.algorithms import RSAAlgorithm

from config import GatewaySettings

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"


class KeySourceError(Exception):
    """The keys could not be loaded (unreachable provider, bad document, unreadable file)."""


def parse_jwks(doc: Any) -> dict[str | None, Any]:
    """The RS256 signature keys of a JWKS document by kid; other key types and uses are skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySourceError("not a JWKS document (no 'keys' list)")
    keys: dict[str | None, Any] = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("alg", "RS256") != "RS256":
            continue
        try:
            keys[jwk.get("kid")] = RSAAlgorithm.from_jwk(json.dumps(jwk))
        except (ValueError, TypeError, KeyError) as exc:
            raise KeySourceError(f"malformed RSA key {jwk.get('kid')!r}") from exc
    return keys


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError for the 3xx


class JsonFetcher:
    """GET a JSON document with a total deadline and a size bound, TLS verified."""

    def __init__(self, *, timeout_s: float, max_bytes: int, ca_bundle: Path | None = None):
        context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def get(self, url: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (scheme checked by the caller)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as resp:
                body = bytearray()
                # The socket timeout bounds each read; the deadline bounds a server that trickles bytes.
                while chunk := resp.read(64 * 1024):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise KeySourceError(f"{url}: more than {self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise KeySourceError(f"{url}: not read within {self.timeout_s:g}s")
        except urllib.error.HTTPError as exc:
            raise KeySourceError(f"{url}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise KeySourceError(f"{url}: {exc}") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise KeySourceError(f"{url}: not JSON") from exc


class SigningKeys:
    """Cached verification keys, reloaded on an unknown kid or when stale, at most once per refresh_min_s."""

    def __init__(self, *, refresh_min_s: float, max_age_s: float, clock: Callable[[], float] = time.monotonic):
        self.refresh_min_s = refresh_min_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._keys: dict[str | None, Any] = {}
        self._loaded_at = -float("inf")
        self._attempted_at = -float("inf")
        self._lock = threading.Lock()
        self.loads = 0  # successful loads (tests and logs)

    def _fetch(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def load(self) -> None:
        """The first load: its failure is the caller's (the gateway does not start without keys)."""
        with self._lock:
            self._attempted_at = self._clock()
            self._install(parse_jwks(self._fetch()))

    def _install(self, keys: dict[str | None, Any]) -> None:
        self._keys = keys
        self._loaded_at = self._clock()
        self.loads += 1
        log.info("loaded %d signing keys from %s: %s", len(keys), self.describe(),
                 ", ".join(str(k) for k in keys))

    def _lookup(self, kid: str | None) -> Any | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # a single key may go unnamed
        return self._keys.get(kid) if kid is not None else None

    def wants_reload(self, kid: str | None) -> bool:
        """Whether looking up ``kid`` now would load the keys (the caller may then do it off the event loop)."""
        now = self._clock()
        due = self._lookup(kid) is None or now - self._loaded_at >= self.max_age_s
        return due and now - self._attempted_at >= self.refresh_min_s

    def key(self, kid: str | None) -> Any | None:
        if self.wants_reload(kid):
            with self._lock:
                if self.wants_reload(kid):  # another thread may have reloaded meanwhile
                    self._reload()
        return self._lookup(kid)

    def _reload(self) -> None:
        self._attempted_at = self._clock()
        try:
            keys = parse_jwks(self._fetch())
        except KeySourceError as exc:
            log.warning("reloading the signing keys from %s failed (keeping the %d held): %s",
                        self.describe(), len(self._keys), exc)
            return
        self._install(keys)


class JwksFile(SigningKeys):
    """A JWKS file, read again on an unknown kid: replacing the file rotates keys without a restart."""

    def __init__(self, path: Path, *, max_bytes: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = path
        self.max_bytes = max_bytes

    def describe(self) -> str:
        return str(self.path)

    def _fetch(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except OSError as exc:
            raise KeySourceError(f"cannot read the JWKS file {self.path}: {exc}") from exc
        if len(data) > self.max_bytes:
            raise KeySourceError(f"the JWKS file {self.path} has more than {self.max_bytes} bytes")
        try:
            doc: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise KeySourceError(f"the JWKS file {self.path} is not JSON") from exc
        return doc


class OidcJwks(SigningKeys):
    """An OpenID provider's keys: ``<issuer>/.well-known/openid-configuration`` names the ``jwks_uri``."""

    def __init__(self, issuer: str, fetcher: JsonFetcher, **kwargs: Any):
        super().__init__(**kwargs)
        if why := GatewaySettings.idp_url_problem(issuer):
            raise KeySourceError(f"issuer {issuer}: {why}")
        self.issuer = issuer
        self._fetcher = fetcher
        self.jwks_uri: str | None = None

    def describe(self) -> str:
        return self.jwks_uri or self.issuer

    def _discover(self) -> str:
        doc = self._fetcher.get(self.issuer.rstrip("/") + DISCOVERY_PATH)
        if not isinstance(doc, dict):
            raise KeySourceError(f"{self.issuer}: the discovery document is not an object")
        # OpenID Connect Discovery 1.0 §4.3: the document must name exactly the issuer it was fetched for.
        if doc.get("issuer") != self.issuer:
            raise KeySourceError(f"{self.issuer}: the discovery document names issuer {doc.get('issuer')!r}")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str):
            raise KeySourceError(f"{self.issuer}: the discovery document has no jwks_uri")
        if why := GatewaySettings.idp_url_problem(uri):
            raise KeySourceError(f"jwks_uri {uri}: {why}")
        return uri

    def _fetch(self) -> dict[str, Any]:
        if self.jwks_uri is None:  # discovered once; the provider's keys change, its endpoints do not
            self.jwks_uri = self._discover()
        doc: dict[str, Any] = self._fetcher.get(self.jwks_uri)
        return doc
