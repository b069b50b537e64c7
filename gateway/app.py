"""The aiohttp app factory: services start and stop with the app; handlers live in gateway/handlers.py."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway import metrics as GM
from gateway.audit import AuditLog
from gateway.auth import Authenticator
from gateway.bus import Bus
from gateway.limits import DailyQuota, TokenBuckets
from gateway.objects import GatewayObjects
from gateway.problems import Problem
from gateway.store import GatewayStore
from infra.settings import GatewaySettings, SettingsError, kafka_client

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """What the handlers use; built at app start-up, closed at clean-up."""

    settings: GatewaySettings
    auth: Authenticator
    bus: Bus
    store: GatewayStore
    objects: GatewayObjects
    buckets: TokenBuckets
    quota: DailyQuota
    audit: AuditLog
    catalog: Any  # model_store.catalog.ModelCatalog, or None when no local model repository
    inflight: int = 0
    cluster: Any = field(default=None, repr=False)


GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", GatewaySettings)


def _catalog(settings: GatewaySettings) -> Any:
    """Pins are checked against the registry's routing (the `models` topic), else the local repository."""
    from model_store.catalog import ModelCatalog
    from model_store.watch import ModelWatcher

    p = settings.pipeline
    watcher = ModelWatcher(kafka_client(p.stream), p.stream.registry_url, p.stream.topic_prefix,
                           registry_ca=p.stream.tls_ca_file)
    watcher.start(p.lifecycle.watch_catch_up_s)
    return ModelCatalog(p.models_dir, table=watcher.table)


async def _services(app: web.Application) -> AsyncIterator[None]:
    from stream.cassandra import connect

    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    # Discovery and the first key load block (bounded by DETECTFLOW_OIDC_TIMEOUT_S); no keys, no start. First,
    # so that a bad auth configuration fails before any backend is touched.
    auth = await loop.run_in_executor(None, Authenticator.from_settings, settings)
    session = await loop.run_in_executor(None, connect, settings.pipeline.stream, "gateway")
    p = settings.pipeline
    store = GatewayStore(session, result_ttl_s=p.result_ttl_s, idempotency_ttl_s=settings.idempotency_ttl_s,
                         audit_ttl_s=settings.audit_ttl_s)
    catalog = await loop.run_in_executor(None, _catalog, settings)
    bus = Bus(settings)
    await bus.start()
    objects = GatewayObjects(settings)
    gw = Gateway(settings=settings, auth=auth, bus=bus, store=store, objects=objects,
                 buckets=TokenBuckets(settings.rate_per_s, settings.rate_burst),
                 quota=DailyQuota(settings.daily_quota, store.quota_used, store.quota_add),
                 audit=AuditLog(bus, store, f"{p.stream.topic_prefix}audit"), catalog=catalog,
                 cluster=session.cluster)
    app[GATEWAY] = gw
    log.info("gateway ready: reply partition %s", bus.router.reply_to)
    try:
        yield
    finally:
        await gw.audit.drain()
        await bus.close()
        objects.close()
        await loop.run_in_executor(None, session.cluster.shutdown)


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def problems_middleware(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    t0 = time.perf_counter()
    route = _route_name(request)
    try:
        resp = await handler(request)
    except Problem as p:
        resp = p.response(request.path)
    except web.HTTPRequestEntityTooLarge:
        resp = Problem("BODY_TOO_LARGE", f"the limit is {request.app[SETTINGS].max_body_bytes} bytes").response(
            request.path)
    except web.HTTPNotFound:
        resp = Problem("NOT_FOUND", "no such route").response(request.path)
    except web.HTTPMethodNotAllowed as exc:
        resp = Problem("METHOD_NOT_ALLOWED", f"allowed: {', '.join(sorted(exc.allowed_methods))}",
                       headers={"Allow": ",".join(sorted(exc.allowed_methods))}).response(request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {400: "INVALID_REQUEST", 413: "BODY_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}.get(exc.status)
        resp = (Problem(code, exc.reason) if code else Problem("INVALID_REQUEST", exc.reason,
                                                                status=exc.status)).response(request.path)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, route)
        resp = Problem("INTERNAL", "see the gateway log").response(request.path)
    GM.HTTP_REQUESTS.labels(route, request.method, str(resp.status)).inc()
    GM.HTTP_SECONDS.labels(route).observe(time.perf_counter() - t0)
    return resp


def create_app(settings: GatewaySettings) -> web.Application:
    from gateway import handlers as h

    app = web.Application(client_max_size=settings.max_body_bytes + 256 * 1024, middlewares=[problems_middleware])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_services)
    app.router.add_post("/v1/detect", h.detect)
    app.router.add_get("/v1/requests/{id}", h.get_request)
    app.router.add_post("/v1/uploads", h.create_uploads)
    app.router.add_post("/v1/jobs", h.create_job)
    app.router.add_get("/v1/jobs/{id}", h.get_job)
    app.router.add_get("/v1/jobs/{id}/results", h.job_results)
    app.router.add_delete("/v1/images/{id}", h.delete_image)
    app.router.add_delete("/v1/tenants/{tenant}/data", h.erase_tenant)
    app.router.add_get("/v1/tenants/{tenant}/policy", h.get_policy)
    app.router.add_put("/v1/tenants/{tenant}/policy", h.put_policy)
    app.router.add_get("/v1/audit", h.audit_events)
    app.router.add_get("/openapi.json", h.openapi)
    app.router.add_get("/livez", h.livez)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/metrics", h.metrics)
    return app


def server_tls(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The HTTPS context the gateway serves with (TLS 1.2 or later), or None with DETECTFLOW_GATEWAY_INSECURE_HTTP."""
    if settings.insecure_http:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise SettingsError("the gateway serves HTTPS: set DETECTFLOW_GATEWAY_TLS_CERT and DETECTFLOW_GATEWAY_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load the gateway's certificate {settings.tls_cert} / key {settings.tls_key} "
                            f"({type(exc).__name__}: {exc}); `detectflow stack up` issues the project CA's, or set "
                            "DETECTFLOW_GATEWAY_TLS_CERT and DETECTFLOW_GATEWAY_TLS_KEY") from exc
    return context


def run_gateway(settings: GatewaySettings) -> None:
    """Serve until SIGTERM/SIGINT (aiohttp's runner stops the app, which closes the services)."""
    web.run_app(create_app(settings), host=settings.host, port=settings.port, access_log=None,
                ssl_context=server_tls(settings), handle_signals=True, shutdown_timeout=15)
