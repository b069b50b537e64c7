"""`detectflow stack up|down|status|logs`: install, start, probe and stop the local stack."""

from __future__ import annotations

import importlib
import sys
import time
from typing import Callable, Iterable

from config import StackSettings
from infra.stack.base import Health, Service, ServiceStartError, StackError
from infra.stack.pki import Pki, issue

# name -> "module:Class"; the order is the order of `status` output.
SERVICE_CLASSES = {
    "kafka": "infra.stack.kafka:KafkaService",
    "registry": "infra.stack.registry:RegistryService",
    "cassandra": "infra.stack.cassandra:CassandraService",
    "minio": "infra.stack.minio:MinioService",
    "clamd": "infra.stack.clamd:ClamdService",
}


def load_services(settings: StackSettings, names: Iterable[str] | None = None) -> list[Service]:
    """Instantiate the named services (all by default) plus everything they depend on."""
    wanted = list(SERVICE_CLASSES) if names is None else list(names)
    unknown = [n for n in wanted if n not in SERVICE_CLASSES]
    if unknown:
        raise StackError(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICE_CLASSES)}")
    built: dict[str, Service] = {}

    def build(name: str) -> None:
        if name in built:
            return
        module_name, cls_name = SERVICE_CLASSES[name].split(":")
        svc: Service = getattr(importlib.import_module(module_name), cls_name)(settings)
        for dep in svc.depends_on:
            build(dep)
        built[name] = svc

    for n in wanted:
        build(n)
    return [built[n] for n in SERVICE_CLASSES if n in built]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def up(settings: StackSettings, names: Iterable[str] | None = None, log: Callable[[str], None] = _say) -> None:
    """Install (first time) and start the services, each once its dependencies are healthy.

    Idempotent: running services are only probed.  Raises ServiceStartError naming the
    service and its log when one fails.
    """
    services = load_services(settings, names)
    _issue_process_certificates(settings)
    for svc in services:
        if not svc.installed():
            log(f"installing {svc.name} (first run; cached under {settings.home}) ...")
            t0 = time.monotonic()
            svc.install(log)
            log(f"installed {svc.name} in {time.monotonic() - t0:.0f}s")

    deadline = time.monotonic() + settings.start_timeout_s
    pending = {svc.name: svc for svc in services}
    healthy: set[str] = set()
    started: dict[str, object] = {}
    while pending:
        progressed = False
        for name, svc in list(pending.items()):
            if any(dep not in healthy for dep in svc.depends_on):
                continue
            if name not in started:
                svc.prepare(log)
                proc = svc.launch()
                started[name] = proc
                log(f"{name}: {'started' if proc else 'already running'} ({svc.address})")
            ok, _detail = svc.probe()
            if ok:
                svc.after_start(log)
                healthy.add(name)
                del pending[name]
                progressed = True
                log(f"{name}: healthy")
                continue
            proc = started[name]
            if proc is not None and proc.poll() is not None:  # type: ignore[attr-defined]
                svc.pidfile.clear()
                raise ServiceStartError(name, f"process exited with code {proc.returncode}",  # type: ignore[attr-defined]
                                        svc.log_path)
            if proc is None and svc.pid() is None:
                raise ServiceStartError(name, "process is gone", svc.log_path)
        if pending and time.monotonic() > deadline:
            name, svc = next(iter(pending.items()))
            _ok, detail = svc.probe()
            raise ServiceStartError(name, f"not healthy within {settings.start_timeout_s:.0f}s ({detail})",
                                    svc.log_path)
        if pending and not progressed:
            time.sleep(0.5)


def _issue_process_certificates(settings: StackSettings) -> None:
    """The HTTPS certificate of the gateway, which `detectflow run` starts (not `stack up`): issued here so that no
    gateway process needs the CA's key, and renewed like the services' (infra/stack/pki.py)."""
    issue(Pki(settings.tls_dir), "gateway")


def down(settings: StackSettings, names: Iterable[str] | None = None, log: Callable[[str], None] = _say) -> None:
    """Stop the named services (all by default), dependents first; data stays on disk."""
    only = None if names is None else set(names)
    for svc in reversed(load_services(settings, names)):
        if only is not None and svc.name not in only:
            continue
        if svc.stop():
            log(f"{svc.name}: stopped")
        else:
            log(f"{svc.name}: not running")


def status(settings: StackSettings, names: Iterable[str] | None = None) -> list[Health]:
    return [svc.health() for svc in load_services(settings, names)]


def format_status(rows: list[Health]) -> str:
    lines = [f"{'SERVICE':<10} {'ADDRESS':<44} {'STATE':<9} {'PID':>7} {'RSS':>9}  DETAIL"]
    for h in rows:
        state = "healthy" if h.healthy else ("unhealthy" if h.running else "down")
        rss = f"{h.rss_bytes / 2**20:.0f}MiB" if h.running else "-"
        lines.append(f"{h.name:<10} {h.address:<44} {state:<9} {h.pid or '-':>7} {rss:>9}  {h.detail}")
    total = sum(h.rss_bytes for h in rows)
    lines.append(f"{'total':<10} {'':<44} {'':<9} {'':>7} {total / 2**20:>6.0f}MiB")
    return "\n".join(lines)
