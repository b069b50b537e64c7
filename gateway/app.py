"""The aiohttp app factory: services start and stop with the app; the routes are gateway/routes.py's table,
the handlers gateway/handlers.py's, the state they share gateway/state.py's."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from config import GatewaySettings, SettingsError
from gateway import metrics as GM
from gateway.audit import AuditLog
from gateway.auth import Authenticator
from gateway.bus import Bus
from gateway.limits import ByteBudget, DailyQuota, FairShares, TokenBuckets
from gateway.objects import GatewayObjects
from gateway.openapi import document
from gateway.problems import Problem
from gateway.routes import ROUTES
from gateway.state import BODIES, DOCUMENT, GATEWAY, SETTINGS, Gateway, Health
from gateway.store import GatewayStore
from model_store.control.watch import ModelWatcher
from model_store.serving.catalog import ModelCatalog
from schemas.names import MODEL_NAME_RULE, valid_model_name
from stream.cassandra import connect
from stream.heap import HeapTrimmer
from stream.kafka import kafka_connection

log = logging.getLogger(__name__)


async def _probe(gw: Gateway) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    checks = {"kafka": loop.run_in_executor(None, gw.bus.ping), "minio": gw.objects.ping(),
              "cassandra": gw.store.ping()}
    results = {}
    for name, aw in checks.items():
        try:
            await asyncio.wait_for(aw, timeout=Health.PROBE_TIMEOUT_S)
            results[name] = "ok"
        except Exception as exc:  # whatever a probe raises, that service is not ready
            results[name] = f"unavailable: {type(exc).__name__}"
    return results


async def _health_loop(gw: Gateway) -> None:
    while True:
        t0 = time.monotonic()
        gw.health.record(await _probe(gw))
        await asyncio.sleep(max(0.1, Health.INTERVAL_S - (time.monotonic() - t0)))


async def _heartbeat_loop(gw: Gateway, deployment: str, instance_id: str) -> None:
    """Every instance_heartbeat_s: this instance's row (TTL three periods), then the live count, which divides
    each tenant's rate (gateway/limits.py TokenBuckets). Off every request's path."""
    period = gw.settings.instance_heartbeat_s
    ttl = max(1, math.ceil(3 * period))
    while True:
        t0 = time.monotonic()
        try:
            await gw.store.heartbeat(deployment, instance_id, int(time.time() * 1000), ttl)
            n = await gw.store.live_instances(deployment)
            if n != gw.buckets.instances:
                log.info("%d gateway instances share the rate limits", n)
            gw.buckets.set_instances(n)
        except Exception as exc:  # Cassandra away (or worse): keep the last count, try again
            log.warning("gateway heartbeat not written: %s", exc)
        await asyncio.sleep(max(0.1, period - (time.monotonic() - t0)))


async def _quota_lease_loop(gw: Gateway) -> None:
    """Give back the quota leases not taken from for quota_lease_idle_s, so that other instances can charge
    them (gateway/limits.py DailyQuota). Off every request's path."""
    while True:
        await asyncio.sleep(max(0.1, gw.settings.quota_lease_idle_s / 2))
        try:
            await gw.quota.release_idle()
        except Exception as exc:  # a background loop must outlive any one failure
            log.warning("idle quota leases not given back this round: %s", exc)


async def _heap_trim_loop(trimmer: HeapTrimmer) -> None:
    """Every heap_trim_interval_s: collect cyclic garbage, then give freed heap pages back to the OS
    (stream/heap.py), so the gateway's RSS follows its working set, not its worst burst of bodies and pages.

    A closed TLS connection is a cycle (transport <-> protocol) holding asyncio's 256 KiB read buffer; with the
    gateway's long-lived objects the oldest generation is collected rarely, and a soak found ~2 such dead
    connections per live one (tracemalloc). The ~100,000 objects made at start are frozen (gc.freeze in
    _services), so this collection walks only what was made since, on the loop (a full one: ~60 ms here)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(trimmer.interval_s)
        gc.collect()
        await loop.run_in_executor(None, trimmer.trim)


# Answered before any gate, from memory: never behind the body budget, the rate limit or a backing service.
HEALTH_ROUTES = frozenset({"/livez", "/readyz", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _catalog(settings: GatewaySettings) -> ModelCatalog:
    """Pins are checked against the registry's routing (the `models` topic), else the local repository."""
    p = settings.pipeline
    watcher = ModelWatcher(kafka_connection(p.stream), p.stream.registry_url, p.stream.topic_prefix,
                           registry_ca=p.stream.tls_ca_file)
    watcher.start(p.lifecycle.watch_catch_up_s)
    return ModelCatalog(p.models_dir, table=watcher.table)


async def _services(app: web.Application) -> AsyncIterator[None]:
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
                 quota=DailyQuota(settings.daily_quota, store.quota_used, store.quota_compare_and_set,
                                  lease_max=settings.quota_lease_max, lease_idle_s=settings.quota_lease_idle_s),
                 audit=AuditLog(bus, store, f"{p.stream.topic_prefix}audit"), catalog=catalog,
                 shares=FairShares(settings.max_inflight, floor=settings.sync_share_floor,
                                   window_s=settings.active_tenant_window_s),
                 health=Health(), cluster=session.cluster)
    app[GATEWAY] = gw
    app[BODIES] = ByteBudget(settings.max_inflight_body_bytes)
    deployment, instance_id = p.stream.topic_prefix or "-", uuid.uuid4().hex
    tasks = [asyncio.create_task(_health_loop(gw), name="health"),
             asyncio.create_task(_heartbeat_loop(gw, deployment, instance_id), name="heartbeat"),
             asyncio.create_task(_quota_lease_loop(gw), name="quota-leases")]
    trimmer = HeapTrimmer(p.stream.heap_trim_interval_s)
    if trimmer.interval_s > 0:
        if app.get(OWN_PROCESS):  # not in a host process (the tests'), whose objects are not all this long-lived
            gc.freeze()  # what start made lives as long as the process: later collections skip it
        tasks.append(asyncio.create_task(_heap_trim_loop(trimmer), name="heap-trim"))
    log.info("gateway ready: reply partition %s", bus.router.reply_to)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # unused leases back to the tenants' rows (a crash loses them for the day)
            await asyncio.wait_for(gw.quota.release_all(), timeout=10)
        except TimeoutError:
            log.warning("quota leases not all given back within 10 s (lost for the day)")
        try:
            await gw.store.instance_gone(deployment, instance_id)
        except Problem as exc:
            log.warning("gateway heartbeat row not removed (it expires): %s", exc)
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


def body_limit(settings: GatewaySettings, route: str) -> int:
    """The most bytes a route's body may have: an image for /v1/detect, JSON anywhere else."""
    return settings.max_body_bytes if route == "/v1/detect" else settings.max_json_bytes


@web.middleware
async def body_budget_middleware(request: web.Request,
                                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                 ) -> web.StreamResponse:
    """Reserve the body's bytes before anything reads it: its declared Content-Length (413 at once past the
    route's limit), or the route's limit when the length is not declared (chunked; the readers stop at it).
    503 when the reservation does not fit this instance's budget; released when the call ends, however."""
    if request.method not in BODY_METHODS or request.path in HEALTH_ROUTES:
        return await handler(request)
    limit = body_limit(request.app[SETTINGS], _route_name(request))
    declared = request.content_length
    if declared is not None and declared > limit:
        GM.REFUSED.labels("body_too_large").inc()
        raise Problem("BODY_TOO_LARGE", f"the body declares {declared} bytes, the limit is {limit}")
    n = limit if declared is None else declared
    budget = request.app[BODIES]
    if not budget.reserve(n):
        GM.REFUSED.labels("overloaded_bytes").inc()
        raise Problem("OVERLOADED", "this instance holds as many request bodies as it may; retry soon",
                      headers={"Retry-After": "1"})
    GM.BODY_BYTES_RESERVED.set(budget.reserved)
    try:
        return await handler(request)
    finally:
        budget.release(n)
        GM.BODY_BYTES_RESERVED.set(budget.reserved)


# Set by run_gateway: the app is the whole process (gc.freeze at start is then safe).
OWN_PROCESS = web.AppKey("own_process", bool)


def create_app(settings: GatewaySettings) -> web.Application:
    if not valid_model_name(settings.pipeline.default_model):  # or every call that names no model is refused
        raise SettingsError(f"DETECTFLOW_DEFAULT_MODEL={settings.pipeline.default_model!r}: {MODEL_NAME_RULE}")
    # client_max_size is a backstop only: the body readers (gateway/inputs.py) stop at the route's limit.
    app = web.Application(client_max_size=settings.max_body_bytes + 256 * 1024,
                          middlewares=[problems_middleware, body_budget_middleware])
    app[SETTINGS] = settings
    app[DOCUMENT] = document(settings, ROUTES)
    app.cleanup_ctx.append(_services)
    for route in ROUTES:  # GET routes answer HEAD too (aiohttp's add_get), which HTTP defines by GET
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)
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
    app = create_app(settings)
    app[OWN_PROCESS] = True
    web.run_app(app, host=settings.host, port=settings.port, access_log=None,
                ssl_context=server_tls(settings), handle_signals=True, shutdown_timeout=15)
