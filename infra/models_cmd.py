"""`detectflow models list|push|promote|canary|shadow|rollback|retire|purge|compare`: the registry's CLI.

Every change goes through model_store.control.registry (compare-and-set in Cassandra, published on the
compacted `models` topic, audited). promote and canary first wait (``ready_wait_s``) for an inference
process to report the version READY (loaded and warmed up), so traffic never switches to a version
that is still loading; a LOAD_FAILED report stops the switch. Exit codes: 0 done, 1 refused (gate
failed, load failed, a state that does not allow the command), 2 usage or unreachable stack.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from config import PipelineSettings, StackSettings
from model_store.control.registry import GateRefused, RegistryError, connect_registry
from model_store.control.watch import ModelWatcher, wait_for_report
from model_store.tools.evalset import ensure_eval_set
from model_store.tools.gate import gate_runner
from stream.errors import TransientError
from stream.kafka import kafka_connection


def actor_name() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def run_models(stack: StackSettings, action: str, name: str | None = None, *, version: int | str | None = None,
               percent: float | None = None, source: Path | None = None, as_json: bool = False, force: bool = False,
               no_wait: bool = False, no_guardrail: bool = False, reason: str | None = None,
               actor: str | None = None) -> int:
    """`detectflow models ACTION ...`: ``action`` is the sub-command, the rest its arguments (those it has)."""
    settings = PipelineSettings.from_env()
    actor = actor or actor_name()
    try:
        registry = connect_registry(settings)
        if action == "list":
            return _list(registry, as_json)
        assert name is not None, f"`models {action}` names a model"
        if action == "push":
            return _push(registry, name, source, settings, stack, actor)
        if action == "compare":
            return _compare(registry, name, as_json)
        if action == "purge":
            registry.purge(name, actor=actor)
            print(f"{name}: purged from the registry")
            return 0
        if action in ("promote", "canary"):
            assert isinstance(version, int), f"`models {action}` names a version number"
            if not no_wait and not _await_ready(registry, settings, name, version, force):
                return 1
            if action == "promote":
                state = registry.promote(name, version, actor=actor, force=force)
            else:
                state = registry.canary(name, version, percent, actor=actor, force=force,
                                        guardrail=not no_guardrail)
        elif action == "shadow":
            shadow = None if str(version).lower() == "off" else int(str(version))
            state = registry.shadow(name, shadow, actor=actor)
        elif action == "rollback":
            state = registry.rollback(name, actor=actor, reason=reason)
        elif action == "retire":
            state = registry.retire(name, version, actor=actor)
        else:
            raise AssertionError(action)
    except GateRefused as exc:
        print(f"detectflow models: refused by the release gate: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"detectflow models: {exc}", file=sys.stderr)
        return 1
    except (TransientError, ValueError) as exc:
        print(f"detectflow models: {exc}", file=sys.stderr)
        return 2
    print(describe(state))
    return 0


def describe(state: Any) -> str:
    parts = [f"{state.model}: production v{state.production}"]
    if state.canary is not None:
        parts.append(f"canary v{state.canary} at {state.canary_percent:g}%"
                     + ("" if state.guardrail else " (A/B, no guardrails)"))
    if state.shadow is not None:
        parts.append(f"shadow v{state.shadow}")
    if state.previous:
        parts.append("rollback to v" + str(state.previous[0]))
    parts.append("servable " + ",".join(f"v{v}" for v in state.versions))
    return "; ".join(parts)


def _await_ready(registry: Any, settings: PipelineSettings, model: str, version: int, force: bool) -> bool:
    """Wait for an inference process's READY (or LOAD_FAILED) report on the version."""
    info = registry.store.version(model, version)
    if info is None:
        return True  # the command itself says why
    watcher = ModelWatcher(kafka_connection(settings.stream, "registry"), settings.stream.registry_url,
                           settings.stream.topic_prefix, registry_ca=settings.stream.tls_ca_file)
    watcher.start(settings.lifecycle.watch_catch_up_s)
    try:
        t0 = time.monotonic()
        report = wait_for_report(watcher.table, model, version, since_ms=info.pushed_at_ms,
                                 timeout_s=settings.lifecycle.ready_wait_s)
    finally:
        watcher.stop()
    if report is None:
        print(f"note: no inference process reported {model} v{version} READY within "
              f"{settings.lifecycle.ready_wait_s:g}s; switching anyway (it loads on first use)", file=sys.stderr)
        return True
    if report.action == "LOAD_FAILED":
        print(f"{model} v{version} failed to load on {report.instance}: {report.reason}", file=sys.stderr)
        if not force:
            print("not switching (the current version keeps serving); --force to switch anyway", file=sys.stderr)
            return False
        return True
    print(f"{model} v{version} READY on {report.instance} ({report.reason}; waited {time.monotonic() - t0:.1f}s)")
    return True


def _push(registry: Any, name: str, source: Path | None, settings: PipelineSettings, stack: StackSettings,
          actor: str) -> int:
    if source is None:
        if name != settings.default_model:
            print("detectflow models push: give the folder holding model.onnx and config.json", file=sys.stderr)
            return 2
        from model_store.tools.convert import convert  # only to convert the default model first: the darknet toolchain

        source = settings.models_dir / settings.default_model / "1"
        convert(source)
    outcome = registry.push(name, source, actor=actor,
                            gate=gate_runner(settings.lifecycle, ensure_eval_set(stack)))
    print(f"{name} v{outcome.version}: {'pushed' if outcome.created else 'already in the registry'}; "
          f"release gate {outcome.gate_status}")
    for check in outcome.report.get("checks", []):
        print(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['name']:<8} {check['detail']}")
    print(describe(registry.routing(name)))
    if outcome.gate_status != "PASSED":
        print("the version is stored but cannot be promoted or canaried without --force (audited)", file=sys.stderr)
        return 1
    return 0


def _list(registry: Any, as_json: bool) -> int:
    rows = []
    for state, versions in registry.listing():
        for v in versions:
            role = ("production" if v.version == state.production else
                    f"canary {state.canary_percent:g}%" if v.version == state.canary else
                    "shadow" if v.version == state.shadow else
                    "retired" if v.retired else
                    "previous" if v.version in state.previous else "available")
            rows.append({"model": state.model, "version": v.version, "role": role, "gate": v.gate_status,
                         "map50": v.metrics.get("map50"), "p95_ms": v.metrics.get("p95_ms"), "sha256": v.sha256,
                         "converter": v.provenance.get("converter_version"), "pushed_by": v.pushed_by,
                         "pushed_at_ms": v.pushed_at_ms})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<20} {'ver':>3} {'role':<12} {'gate':<6} {'mAP50':>6} {'P95 ms':>7} {'sha256':<12} converter")
    for r in rows:
        m = f"{r['map50']:.3f}" if r["map50"] is not None else "-"
        p = f"{r['p95_ms']:.1f}" if r["p95_ms"] is not None else "-"
        print(f"{r['model']:<20} {r['version']:>3} {r['role']:<12} {r['gate']:<6} {m:>6} {p:>7} {r['sha256'][:12]:<12} "
              f"{(r['converter'] or '-')[:60]}")
    return 0


def summarize_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (production, shadow) version pair: totals and per-class match rates."""
    pairs: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["production_version"], r["shadow_version"])
        pair = pairs.setdefault(key, {"production_version": key[0], "shadow_version": key[1], "classes": {}})
        if r["class_name"] == "*":
            images = r["images"]
            pair.update({"images": images, "matched": r["matched"], "production_only": r["production_only"],
                         "shadow_only": r["shadow_only"],
                         "production_ms_mean": r["production_ms_sum"] / images if images else None,
                         "shadow_ms_mean": r["shadow_ms_sum"] / images if images else None,
                         "mean_abs_score_delta": r["score_delta_sum"] / r["matched"] if r["matched"] else None})
        else:
            pair["classes"][r["class_name"]] = {k: r[k] for k in ("matched", "production_only", "shadow_only")}
    out = []
    for pair in pairs.values():
        produced = pair.get("matched", 0) + pair.get("production_only", 0)
        pair["agreement"] = pair.get("matched", 0) / produced if produced else None
        out.append(pair)
    return sorted(out, key=lambda p: (p["production_version"], p["shadow_version"]))


def _compare(registry: Any, model: str, as_json: bool) -> int:
    pairs = summarize_agreement(registry.store.agreement(model))
    if as_json:
        print(json.dumps(pairs, indent=2))
        return 0
    if not pairs:
        print(f"{model}: no shadow comparisons yet (set one with `detectflow models shadow {model} VERSION`, and run "
              f"the shadow and monitor roles)")
        return 0
    for p in pairs:
        agree = f"{p['agreement']:.1%}" if p["agreement"] is not None else "-"
        delta = f"{p['mean_abs_score_delta']:.4f}" if p.get("mean_abs_score_delta") is not None else "-"
        lat = (f"{p['production_ms_mean']:.1f} ms vs {p['shadow_ms_mean']:.1f} ms"
               if p.get("production_ms_mean") is not None and p.get("shadow_ms_mean") is not None else "-")
        print(f"{model}: production v{p['production_version']} vs shadow v{p['shadow_version']} over "
              f"{p.get('images', 0)} images")
        print(f"  detections matched at IoU 0.5 (same class): {p.get('matched', 0)}; production only "
              f"{p.get('production_only', 0)}; shadow only {p.get('shadow_only', 0)}; agreement {agree}")
        print(f"  mean |score delta| of matches: {delta}; model latency per image: {lat}")
        print(f"  {'class':<16} {'matched':>8} {'prod-only':>10} {'shadow-only':>12}")
        for name, c in sorted(p["classes"].items()):
            print(f"  {name:<16} {c['matched']:>8} {c['production_only']:>10} {c['shadow_only']:>12}")
    return 0
