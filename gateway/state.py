"""What the gateway's handlers share: the Gateway services object, its readiness, and the app keys.

Its own module so that gateway/app.py (which builds it) and gateway/handlers.py (which use it) both import it
and neither imports the other (docs/architecture.md: no import cycles).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cassandra.cluster import Cluster

from config import GatewaySettings
from gateway.audit import AuditLog
from gateway.auth import Authenticator
from gateway.bus import Bus
from gateway.limits import ByteBudget, DailyQuota, FairShares, TokenBuckets
from gateway.objects import GatewayObjects
from gateway.store import GatewayStore
from model_store.serving.catalog import ModelCatalog


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
    catalog: ModelCatalog | None  # None: pins are left to the pipeline to check
    shares: FairShares
    health: Health
    cluster: Cluster | None = field(default=None, repr=False)


class Health:
    """Readiness as last probed by a background task: /readyz answers from here at once, never waiting on
    Kafka, MinIO or Cassandra (a probe that hangs makes the answer stale, and stale is not ready)."""

    INTERVAL_S = 2.0
    PROBE_TIMEOUT_S = 2.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.checks: dict[str, str] = {}
        self.at: float | None = None

    def record(self, checks: dict[str, str]) -> None:
        self.checks, self.at = checks, self._clock()

    def ready(self) -> tuple[bool, dict[str, str]]:
        if self.at is None:
            return False, {"probe": "not run yet"}
        age = self._clock() - self.at
        if age > 3 * self.INTERVAL_S + self.PROBE_TIMEOUT_S:
            return False, {**self.checks, "probe": f"stale ({age:.0f} s old)"}
        return all(v == "ok" for v in self.checks.values()), self.checks


GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", GatewaySettings)
BODIES = web.AppKey("bodies", ByteBudget)
# The OpenAPI document, generated once when the app is built (gateway/openapi.py).
DOCUMENT = web.AppKey("openapi", dict[str, Any])
