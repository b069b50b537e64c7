"""`detectflow models list|push|promote|canary|shadow|rollback|retire|purge|compare`: the registry's CLI.

Every change goes through model_store.registry (compare-and-set in Cassandra, published on the
compacted `models` topic, audited). promote and canary first wait (``ready_wait_s``) for an inference
process to report the version READY (loaded and warmed up), so traffic never switches to a version
that is still loading; a LOAD_FAILED report stops the switch. Exit codes: 0 done, 1 refused (gate
failed, load failed, a state that does not allow the command), 2 usage or unreachable stack.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from config import PipelineSettings, StackSettings, kafka_client


def actor_name() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def add_cli(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="the model registry: versions, rollout, rollback, shadow comparison")
    ms = p.add_subparsers(dest="models_action", required=True)
    ls = ms.add_parser("list", help="models, versions, their gate and where they serve")
    ls.add_argument("--json", action="store_true")
    ps = ms.add_parser("push", help="add a version (release gate: ONNX checker, output contract, mAP, P95 latency)")
    ps.add_argument("name")
    ps.add_argument("source", nargs="?", type=Path,
                    help="folder with model.onnx and config.json (default: the converted default model)")
    pr = ms.add_parser("promote", help="make a version production (100%% of unpinned traffic)")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    ca = ms.add_parser("canary", help="route PERCENT of unpinned traffic (by request-id hash) to a version")
    ca.add_argument("name")
    ca.add_argument("version", type=int)
    ca.add_argument("percent", type=float)
    ca.add_argument("--no-guardrail", action="store_true",
                    help="an A/B split: no automatic rollback on error-rate or latency breaches")
    for sp in (pr, ca):
        sp.add_argument("--force", action="store_true", help="override a failed release gate (audited)")
        sp.add_argument("--no-wait", action="store_true", help="do not wait for an inference process to report READY")
    sh = ms.add_parser("shadow", help="run a version as shadow (own consumer group -> detections.shadow), or 'off'")
    sh.add_argument("name")
    sh.add_argument("version", help="a version number, or off")
    rb = ms.add_parser("rollback", help="abort the canary, or restore the previous production version")
    rb.add_argument("name")
    rb.add_argument("--reason", default=None)
    rt = ms.add_parser("retire", help="stop offering a version (not production, canary or shadow)")
    rt.add_argument("name")
    rt.add_argument("version", type=int)
    pg = ms.add_parser("purge", help="delete a model from the registry: files and rows (audited)")
    pg.add_argument("name")
    cp = ms.add_parser("compare", help="shadow agreement with production (IoU 0.5 per class, score deltas, latency)")
    cp.add_argument("name")
    cp.add_argument("--json", action="store_true")
    for sp in (ls, ps, pr, ca, sh, rb, rt, pg, cp):
        sp.add_argument("--actor", default=None, help="who is acting, for the audit log (default user@host)")
    return p


def run_models(args: argparse.Namespace, stack: StackSettings) -> int:
    from model_store.registry import GateRefused, RegistryError, connect_registry
    from stream.errors import TransientError

    settings = PipelineSettings.from_env()
    actor = args.actor or actor_name()
    try:
        registry = connect_registry(settings)
        action = args.models_action
        if action == "list":
            return _list(registry, args.json)
        if action == "push":
            return _push(registry, args, settings, stack, actor)
        if action == "compare":
            return _compare(registry, args.name, args.json)
        if action == "purge":
            registry.purge(args.name, actor=actor)
            print(f"{args.name}: purged from the registry")
            return 0
        if action in ("promote", "canary"):
            if not args.no_wait and not _await_ready(registry, settings, args.name, args.version, args.force):
                return 1
            if action == "promote":
                state = registry.promote(args.name, args.version, actor=actor, force=args.force)
            else:
                state = registry.canary(args.name, args.version, args.percent, actor=actor, force=args.force,
                                        guardrail=not args.no_guardrail)
        elif action == "shadow":
            version = None if args.version.lower() == "off" else int(args.version)
            state = registry.shadow(args.name, version, actor=actor)
        elif action == "rollback":
            state = registry.rollback(args.name, actor=actor, reason=args.reason)
        elif action == "retire":
            state = registry.retire(args.name, args.version, actor=actor)
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
    from model_store.watch import ModelWatcher, wait_for_report

    info = registry.store.version(model, version)
    if info is None:
        return True  # the command itself says why
    watcher = ModelWatcher(kafka_client(settings.stream, "registry"), settings.stream.registry_url,
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


def _push(registry: Any, args: argparse.Namespace, settings: PipelineSettings, stack: StackSettings,
          actor: str) -> int:
    from model_store.evalset import ensure_eval_set
    from model_store.gate import gate_runner

    source = args.source
    if source is None:
        if args.name != settings.default_model:
            print("detectflow models push: give the folder holding model.onnx and config.json", file=sys.stderr)
            return 2
        from model_store.convert import convert

        source = settings.models_dir / settings.default_model / "1"
        convert(source)
    outcome = registry.push(args.name, source, actor=actor,
                            gate=gate_runner(settings.lifecycle, ensure_eval_set(stack)))
    print(f"{args.name} v{outcome.version}: {'pushed' if outcome.created else 'already in the registry'}; "
          f"release gate {outcome.gate_status}")
    for check in outcome.report.get("checks", []):
        print(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['name']:<8} {check['detail']}")
    print(describe(registry.routing(args.name)))
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
