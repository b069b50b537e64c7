"""Settings of the HTTP gateway (gateway/): listener and TLS, authentication, limits, backpressure."""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping
from urllib.parse import urlsplit

from pydantic import Field

from config.base import ENV_PREFIX, OptionalPath, Port, Settings, SettingsError, setting
from config.pipeline import PipelineSettings
from config.stack import StackSettings

# An unclaimed pre-signed upload lives its URL's life plus at least this grace before its lifecycle rule may
# expire it (DETECTFLOW_UNCLAIMED_UPLOAD_DAYS), so a slow client's upload is never removed under it.
UPLOAD_GRACE_S = 3600


class GatewaySettings(Settings):
    """Settings of the HTTP gateway (gateway/)."""

    pipeline: PipelineSettings = Field(description="The pipeline's settings")
    host: str = setting("127.0.0.1", doc="Address the gateway listens on; default the stack's host",
                        env="GATEWAY_HOST", min_length=1)
    port: Port = setting(8080, doc="Port the gateway listens on", env="GATEWAY_PORT")
    # HTTPS (docs/security.md): the certificate chain and key the gateway serves, PEM; by default the project
    # CA's `gateway` certificate, which `stack up` issues. insecure_http serves plain HTTP instead, for
    # development only (DETECTFLOW_GATEWAY_INSECURE_HTTP=true; the gateway warns when it starts so).
    tls_cert: OptionalPath = setting(None, doc="Certificate chain served (PEM); default the project CA's gateway "
                                               "certificate", env="GATEWAY_TLS_CERT", empty_unsets=True)
    tls_key: OptionalPath = setting(None, doc="Private key of tls_cert (PEM)", env="GATEWAY_TLS_KEY",
                                    empty_unsets=True)
    insecure_http: bool = setting(False, doc="Serve plain HTTP (development only)", env="GATEWAY_INSECURE_HTTP")
    # Where the gateway's URLs point clients (Location headers); pre-signed URLs use public_minio_endpoint.
    public_minio_endpoint: str = setting("127.0.0.1:9000", doc="MinIO endpoint in pre-signed URLs; default "
                                                               "minio_endpoint", min_length=1)
    minio_region: str = setting("us-east-1", doc="Region pre-signed URLs are signed for", min_length=1)
    # Auth (docs/security.md): RS256 keys from an OpenID provider (oidc_issuer, by discovery) or from a
    # JWKS file. auth_dev turns on the development mode: the local dev keys and, if allowed, HS256.
    auth_dev: bool = setting(False, doc="Development auth: the local dev keys (and HS256 if allowed)")
    oidc_issuer: str | None = setting(None, doc="OpenID provider's issuer URL (keys by discovery)",
                                      empty_unsets=True)
    jwks_file: OptionalPath = setting(None, doc="JWKS file of RS256 keys; dev mode: <home>/secrets/jwks.json",
                                      empty_unsets=True)
    hs256_secret_file: OptionalPath = setting(None, doc="HS256 shared secret (needs allow_hs256); default "
                                                        "<home>/secrets/jwt-hs256.key", empty_unsets=True)
    allow_hs256: bool = setting(False, doc="Accept HS256 tokens (development only; default auth_dev)")
    issuer: str = setting("detectflow", doc="Expected iss of tokens; default oidc_issuer, else detectflow",
                          env="JWT_ISSUER", min_length=1)
    audience: str = setting("detectflow-api", doc="Expected aud of tokens", env="JWT_AUDIENCE", min_length=1)
    tenant_claim: str = setting("tenant", doc="Token claim naming the tenant", env="JWT_TENANT_CLAIM", min_length=1)
    clock_skew_s: int = setting(30, doc="Clock skew tolerated on exp/nbf/iat (s)", env="JWT_CLOCK_SKEW_S", ge=0)
    # exp - iat may not exceed this: a leaked long-lived token would otherwise outlive any key rotation.
    max_token_lifetime_s: int = setting(24 * 3600, doc="Longest token lifetime accepted, exp - iat (s)",
                                        env="JWT_MAX_LIFETIME_S", ge=1)
    # Key reloads: on an unknown kid at most once per jwks_refresh_min_s; at least every jwks_max_age_s.
    jwks_refresh_min_s: float = setting(30.0, doc="Shortest time between key reloads on an unknown kid (s)", ge=0)
    jwks_max_age_s: float = setting(3600.0, doc="Longest time between key reloads (s)", gt=0)
    # Fetches from the provider (discovery, JWKS): total deadline, size bound, CA bundle (else the system's).
    idp_timeout_s: float = setting(5.0, doc="Deadline of one fetch from the identity provider (s)",
                                   env="OIDC_TIMEOUT_S", gt=0)
    idp_max_bytes: int = setting(256 * 1024, doc="Largest identity provider response (bytes)", env="OIDC_MAX_BYTES",
                                 ge=1)
    idp_ca_bundle: OptionalPath = setting(None, doc="CA bundle for the identity provider (default: the system's)",
                                          env="OIDC_CA_BUNDLE", empty_unsets=True)
    # Sync calls wait for their reply this long by default, at most sync_timeout_max_s.
    sync_timeout_s: float = setting(10.0, doc="Default wait of a sync call for its reply (s)", gt=0)
    sync_timeout_max_s: float = setting(60.0, doc="Longest wait a sync call may ask for (s)", gt=0)
    max_body_bytes: int = setting(20 * 1024 * 1024, doc="Largest request body (bytes)", ge=1)
    # JSON bodies: at most this many bytes and levels of nesting (checked before parsing).
    max_json_bytes: int = setting(8 * 1024 * 1024, doc="Largest JSON body (bytes)", ge=1024)
    max_json_depth: int = setting(32, doc="Deepest JSON nesting", ge=4)
    # Request bodies held by this instance at once (reserved before a body is read; 503 past it).
    max_inflight_body_bytes: int = setting(256 * 1024 * 1024, doc="Request body bytes this instance holds at once",
                                           ge=1024 * 1024)
    # Per-tenant token bucket and daily quota of images, both shared by every gateway instance: the rate is
    # divided by the live instances (heartbeat rows every instance_heartbeat_s), the quota is one row per day.
    rate_per_s: float = setting(50.0, doc="Per-tenant images per second, all instances together", gt=0)
    rate_burst: int = setting(100, doc="Per-tenant burst of images", ge=1)
    daily_quota: int = setting(1_000_000, doc="Per-tenant images per day", ge=0)
    # The sync path charges the quota row in leases of at most quota_lease_max images (fewer near the limit)
    # and spends them locally; a lease not taken from for quota_lease_idle_s is given back. 1 = one
    # lightweight transaction per call.
    quota_lease_max: int = setting(50, doc="Images per quota lease, at most (1: a transaction per call)", ge=1)
    quota_lease_idle_s: float = setting(10.0, doc="An unused quota lease is given back after this (s)", gt=0)
    instance_heartbeat_s: float = setting(5.0, doc="How often an instance writes its heartbeat row (s)", gt=0)
    # Backpressure (docs/api.md, "Overload and fairness"): max_inflight sync calls per instance, each tenant
    # a share of them (capacity / (tenants active in the last active_tenant_window_s + 1), at least
    # sync_share_floor); past max_online_lag only tenants over their share of recent calls are refused, past
    # max_online_lag_hard (default 4 x max_online_lag) every sync call is.
    max_inflight: int = setting(256, doc="Sync calls in flight per instance, at most", ge=1)
    max_online_lag: int = setting(500, doc="Online lag past which tenants over their share are refused", ge=1)
    max_online_lag_hard: int = setting(2000, doc="Online lag past which every sync call is refused; "
                                                 "default 4 x max_online_lag", ge=1)
    sync_share_floor: int = setting(4, doc="Sync calls in flight a tenant may always have", ge=1)
    active_tenant_window_s: float = setting(5.0, doc="A tenant counts as active this long after a call (s)", gt=0)
    lag_check_interval_s: float = setting(1.0, doc="How often the online lag is measured (s)", gt=0)
    idempotency_ttl_s: int = setting(24 * 3600, doc="How long an Idempotency-Key is remembered (s)", ge=1)
    upload_url_ttl_s: int = setting(900, doc="Life of a pre-signed upload URL (s)", ge=1)
    job_max_items: int = setting(10_000, doc="Images per job, at most", ge=1)
    page_size_default: int = setting(100, doc="Results per page of a request without a size", ge=1)
    page_size_max: int = setting(1000, doc="Results per page, at most", ge=1)
    # A results page stops before its encoded items pass this many bytes (the rest is on the next page).
    page_max_bytes: int = setting(8 * 1024 * 1024, doc="Encoded bytes per results page, at most", ge=64 * 1024)
    # This instance's reply partition of detect.replies (one per gateway instance); -1 = pick at random.
    reply_partition: int = setting(-1, doc="This instance's partition of detect.replies (-1: at random)", ge=-1)
    audit_ttl_s: int = setting(400 * 24 * 3600, doc="Lifetime of an audit record (s)", ge=1)

    @classmethod
    def _env_base(cls, env: Mapping[str, str]) -> dict[str, Any]:
        return {"pipeline": PipelineSettings.from_env(env)}

    def _env_defaults(self, env: Mapping[str, str]) -> dict[str, Any]:
        stack = StackSettings.from_env(env)
        given = self.env_values(env)
        p = ENV_PREFIX
        derived: dict[str, Any] = {"host": stack.host, "public_minio_endpoint": self.pipeline.minio_endpoint,
                                   "max_online_lag_hard": 4 * self.max_online_lag}
        # TLS: the project CA's gateway certificate unless both files are named, or plain HTTP by the flag.
        if self.insecure_http and ("tls_cert" in given or "tls_key" in given):
            raise SettingsError(f"{p}GATEWAY_INSECURE_HTTP=true serves plain HTTP: unset "
                                f"{p}GATEWAY_TLS_CERT and {p}GATEWAY_TLS_KEY, or the flag")
        if ("tls_cert" in given) != ("tls_key" in given):
            raise SettingsError(f"set both {p}GATEWAY_TLS_CERT and {p}GATEWAY_TLS_KEY, or neither "
                                "(the project CA's gateway certificate)")
        if not self.insecure_http:
            derived |= {"tls_cert": stack.tls_dir / "gateway.crt", "tls_key": stack.tls_dir / "gateway.key"}
        # Auth: one key source; dev mode's own keys when none is named.
        if self.oidc_issuer is not None and (why := self.idp_url_problem(self.oidc_issuer)):
            raise SettingsError(f"{p}OIDC_ISSUER={self.oidc_issuer!r}: {why}")
        if self.oidc_issuer is not None and self.jwks_file is not None:
            raise SettingsError(f"set {p}OIDC_ISSUER or {p}JWKS_FILE, not both")
        if self.auth_dev and self.oidc_issuer is None and self.jwks_file is None:
            derived["jwks_file"] = stack.secrets_dir / "jwks.json"  # the dev keys (gateway/devkeys.py)
        # HS256 is a shared secret: anyone who can verify can also mint. Development only.
        allow_hs256 = self.allow_hs256 if "allow_hs256" in given else self.auth_dev
        if allow_hs256 and not self.auth_dev:
            raise SettingsError(f"{p}ALLOW_HS256=true needs {p}AUTH_DEV=true (HS256 is for development only)")
        if "hs256_secret_file" in given and not allow_hs256:
            raise SettingsError(f"{p}HS256_SECRET_FILE is set but HS256 is off ({p}ALLOW_HS256, {p}AUTH_DEV)")
        derived["allow_hs256"] = allow_hs256
        if allow_hs256:
            derived["hs256_secret_file"] = stack.secrets_dir / "jwt-hs256.key"
        if self.idp_ca_bundle is not None and not self.idp_ca_bundle.is_file():
            raise SettingsError(f"{p}OIDC_CA_BUNDLE={str(self.idp_ca_bundle)!r} is not a file")
        # Tokens from the provider carry its issuer URL as iss.
        derived["issuer"] = self.oidc_issuer or "detectflow"
        if self.upload_url_ttl_s > stack.unclaimed_upload_days * 86400 - UPLOAD_GRACE_S:
            raise SettingsError(f"{p}UPLOAD_URL_TTL_S={self.upload_url_ttl_s} must be positive and leave "
                                f"{UPLOAD_GRACE_S} s before {p}UNCLAIMED_UPLOAD_DAYS={stack.unclaimed_upload_days} "
                                "expires uploads")
        return derived

    @property
    def base_url(self) -> str:
        """Where this gateway is reached: https unless insecure_http."""
        return f"{'http' if self.insecure_http else 'https'}://{self.host}:{self.port}"

    @staticmethod
    def idp_url_problem(url: str) -> str | None:
        """Why the gateway will not fetch keys from ``url``, or None when it may."""
        parts = urlsplit(url)
        if not parts.hostname:
            return "not an absolute URL"
        if parts.scheme == "https":
            return None
        if parts.scheme != "http":
            return "only https (or http to a loopback host) is allowed"
        # Plain http would let anyone on the path swap the keys, and so mint any token. On a loopback host
        # nothing is on the path: that is a provider on this machine (a test, a sidecar), so http is allowed.
        try:
            loopback = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        return None if loopback else "plain http is only allowed to a loopback host; use https"

    def require_auth_source(self) -> None:
        """The gateway refuses to start with no way to verify tokens (it never creates keys on its own)."""
        if self.oidc_issuer is None and self.jwks_file is None:
            raise SettingsError(
                f"the gateway needs {ENV_PREFIX}OIDC_ISSUER (an OpenID provider's issuer URL) or {ENV_PREFIX}"
                f"JWKS_FILE (a JWKS file of RS256 keys); for local development set {ENV_PREFIX}AUTH_DEV=true")
