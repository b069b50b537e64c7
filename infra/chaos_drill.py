"""The chaos drill's pure parts: the fault schedule, the reconciliation of what was sent against the terminal
results read back, the stall and latency figures, the RSS growth of a soak, the printed summary, and the check
that the stack is on loopback.

The drill itself (its own pipeline and gateway on a fresh topic prefix, the load, the faults) is
infra/chaos_run.py; `detectflow chaos` (infra/chaos.py) runs it; docs/reliability.md says what it proves and how
to run it.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# What a fault does: kill -9 one pipeline role (the supervisor restarts it), stop then start one stack service,
# SIGSTOP one stack service and SIGCONT it after a while, or stop one stack service and start it again after a
# while (an outage: its clients see connections refused, not a peer that hangs).
KILL_ROLE, RESTART, PAUSE, DOWN = "kill-role", "restart", "pause", "down"
RESTARTABLE = ("kafka", "registry", "cassandra", "minio", "clamd")
PAUSABLE = ("cassandra", "clamd")
# The roles every request passes through: the short form kills one of these (a kill of the bridge or the
# lifecycle roles would not touch the drill's requests).
REQUEST_PATH = ("scan", "preprocess", "inference", "postprocess", "recorder")
# Seconds left after each fault for the pipeline to recover before the next one starts, so that each
# recovery is measured alone.
SHORT_GAP_S, LONG_GAP_S = 15.0, 30.0
# What each fault is expected to take, for the schedule (a restart's real length is measured).
RESTART_ESTIMATE_S = {"kafka": 40.0, "registry": 40.0, "cassandra": 75.0, "minio": 10.0, "clamd": 15.0}
SHORT_FORM_MAX_S = 300.0  # --duration up to this: the short form (a subset of the faults, short pauses)

# DetectionResult fields a redelivery legitimately changes: when and how fast it was made, and whether the
# result cache answered. Two copies that differ only here are the same answer.
TIMING_FIELDS = ("completed_at", "timings_ms", "cache_hit")


class ChaosError(RuntimeError):
    """The drill cannot run here (a non-loopback stack, a service down before it starts...)."""


# ---------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class PlannedFault:
    kind: str  # KILL_ROLE | RESTART | PAUSE | DOWN
    target: str  # the role to kill or the stack service to restart, pause or stop
    at_s: float  # seconds after the load started
    hold_s: float  # PAUSE, DOWN: how long the service stays stopped; otherwise 0

    @property
    def label(self) -> str:
        hold = f" {self.hold_s:.0f}s" if self.kind in (PAUSE, DOWN) else ""
        return f"{self.kind} {self.target}{hold}"

    def expected_s(self) -> float:
        if self.kind == PAUSE:
            return self.hold_s
        if self.kind == DOWN:
            return self.hold_s + RESTART_ESTIMATE_S.get(self.target, 30.0)
        if self.kind == RESTART:
            return RESTART_ESTIMATE_S.get(self.target, 30.0)
        return 2.0


def parse_fault(raw: str, roles: Sequence[str]) -> PlannedFault:
    """``kill:<role>``, ``restart:<service>``, ``pause:<service>[:<seconds>]`` (default 30 s) or
    ``down:<service>[:<seconds>]`` (default 600 s, the outage the reliability promise names) -> an unscheduled
    fault (``plan_faults`` places it)."""
    kind, _, rest = raw.strip().partition(":")
    target, _, hold = rest.partition(":")
    if kind == "kill" and target in roles and not hold:
        return PlannedFault(KILL_ROLE, target, 0, 0)
    if kind == "restart" and target in RESTARTABLE and not hold:
        return PlannedFault(RESTART, target, 0, 0)
    if kind == "pause" and target in PAUSABLE and re.fullmatch(r"[1-9]\d{0,2}|", hold):
        return PlannedFault(PAUSE, target, 0, float(hold or 30))
    if kind == "down" and target in RESTARTABLE and re.fullmatch(r"[1-9]\d{0,2}|", hold):
        return PlannedFault(DOWN, target, 0, float(hold or 600))
    raise ValueError(f"not a fault: {raw!r} (kill:<{'|'.join(roles)}>, restart:<{'|'.join(RESTARTABLE)}>, "
                     f"pause:<{'|'.join(PAUSABLE)}>[:<1-999 seconds>], "
                     f"down:<{'|'.join(RESTARTABLE)}>[:<1-999 seconds>])")


def plan_faults(duration_s: float, seed: int, *, roles: Sequence[str],
                chosen: Sequence[PlannedFault] = ()) -> list[PlannedFault]:
    """The faults of one drill, one at a time, each followed by a recovery gap, all ending before ``duration_s``.

    The short form (``duration_s`` <= SHORT_FORM_MAX_S) is one kill of a role on the request path, one service
    restart (MinIO or clamd, the quick ones) and one pause of Cassandra or clamd for 20-30 s. The long form
    kills a role before each service restart, restarts every stack service in turn and pauses Cassandra and
    clamd for 30-120 s each.
    ``chosen`` (from ``parse_fault``) replaces that schedule with these faults, in this order: a drill of one
    fault, to reproduce what a long drill found in minutes.
    Whatever does not fit in ``duration_s`` is dropped, never squeezed: the returned list is bounded.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible schedule, not a secret
    if not roles:
        raise ValueError("no roles to kill")
    if chosen:
        gap = SHORT_GAP_S if duration_s <= SHORT_FORM_MAX_S else LONG_GAP_S
        wanted = list(chosen)
    elif duration_s <= SHORT_FORM_MAX_S:
        gap = SHORT_GAP_S
        on_path = [r for r in roles if r in REQUEST_PATH] or list(roles)
        wanted = [PlannedFault(KILL_ROLE, rng.choice(on_path), 0, 0),
                  PlannedFault(PAUSE, rng.choice(PAUSABLE), 0, float(rng.randint(20, 30))),
                  PlannedFault(RESTART, rng.choice(("minio", "clamd")), 0, 0)]
    else:
        gap = LONG_GAP_S
        wanted = []
        for service in RESTARTABLE:
            wanted.append(PlannedFault(KILL_ROLE, rng.choice(list(roles)), 0, 0))
            wanted.append(PlannedFault(RESTART, service, 0, 0))
        for service in PAUSABLE:
            wanted.append(PlannedFault(PAUSE, service, 0, float(rng.randint(30, 120))))
    plan: list[PlannedFault] = []
    at = gap  # the load runs alone first: the figures outside faults
    for fault in wanted:
        end = at + fault.expected_s() + gap
        if end > duration_s:
            continue  # a later, shorter one may still fit
        plan.append(PlannedFault(fault.kind, fault.target, at, fault.hold_s))
        at = end
    return plan


# ---------------------------------------------------------------------------------------------- reconciliation


@dataclass(frozen=True)
class Sent:
    """One request the drill made and that the system accepted (it has a request id)."""

    request_id: str
    kind: str  # "sync" | "job" | "ingest"
    lane: str  # "ONLINE" | "BATCH"
    sent_at: float  # time.time()


@dataclass(frozen=True)
class ResultCopy:
    """One DetectionResult read back from the `detections` topic."""

    request_id: str
    lane: str
    status: str
    fingerprint: str  # the result without its timing fields (TIMING_FIELDS)
    completed_at: float  # seconds, time.time() scale


def fingerprint(result: Mapping[str, Any]) -> str:
    """The answer a result carries, without what a redelivery legitimately changes."""
    return json.dumps({k: v for k, v in result.items() if k not in TIMING_FIELDS}, sort_keys=True, default=repr)


def result_copy(result: Mapping[str, Any]) -> ResultCopy:
    completed = result.get("completed_at") or 0
    # timestamp-millis: a datetime once decoded by fastavro, epoch milliseconds when built by hand
    seconds = completed.timestamp() if hasattr(completed, "timestamp") else completed / 1000.0
    return ResultCopy(result["request_id"], str(result.get("lane") or ""), str(result.get("status")),
                      fingerprint(result), seconds)


@dataclass
class Reconciliation:
    sent: int
    sent_by_kind: dict[str, int]
    lost: list[str]  # request ids with no terminal result
    duplicated: list[str]  # request ids with more than one distinct terminal result (or any copy, batch lane)
    redelivered_copies: int  # extra copies of an online result carrying the same answer (at-least-once)
    statuses: dict[str, int]  # first terminal result per request, by status
    first_completion: dict[str, float]  # request id -> completed_at of its first terminal result


def reconcile(sent: Iterable[Sent], copies: Iterable[ResultCopy]) -> Reconciliation:
    """Exactly one terminal result per request: which have none (lost), which have two different ones, or two
    copies on the exactly-once batch lane (duplicated), and how many online copies repeat the same answer
    (redelivered: the online lane is at-least-once, docs/events.md). Results of requests the drill did not
    send are ignored."""
    sent = list(sent)
    by_id: dict[str, list[ResultCopy]] = defaultdict(list)
    wanted = {s.request_id for s in sent}
    for c in copies:
        if c.request_id in wanted:
            by_id[c.request_id].append(c)
    lost, duplicated, redelivered = [], [], 0
    statuses: dict[str, int] = defaultdict(int)
    first: dict[str, float] = {}
    for s in sent:
        got = by_id.get(s.request_id, [])
        if not got:
            lost.append(s.request_id)
            continue
        earliest = min(got, key=lambda c: c.completed_at)
        first[s.request_id] = earliest.completed_at
        statuses[earliest.status] += 1
        if len(got) == 1:
            continue
        if s.lane == "BATCH" or len({c.fingerprint for c in got}) > 1:
            duplicated.append(s.request_id)
        else:
            redelivered += len(got) - 1
    kinds: dict[str, int] = defaultdict(int)
    for s in sent:
        kinds[s.kind] += 1
    return Reconciliation(len(sent), dict(kinds), lost, duplicated, redelivered, dict(statuses), first)


# ---------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class FaultWindow:
    """A fault as it happened: start and end in time.time() seconds (end: the role back, the service healthy
    again, the process continued)."""

    label: str
    start: float
    end: float
    detail: str = ""


def longest_stall(sent: Iterable[Sent], first_completion: Mapping[str, float], end: float) -> tuple[float, float]:
    """The longest interval with no request completing while at least one was outstanding: (seconds, start).

    A request is outstanding from its sending to its first terminal result (to ``end`` when it has none)."""
    events: list[tuple[float, int]] = []
    for s in sent:
        events.append((s.sent_at, 1))
        done = first_completion.get(s.request_id)
        events.append((max(done, s.sent_at) if done is not None else end, -1 if done is not None else 2))
    events.sort(key=lambda e: (e[0], e[1]))  # at a tie, a completion closes a stall before a sending opens one
    outstanding, since, best, best_at = 0, None, 0.0, 0.0
    for t, kind in events:
        if kind == 1:
            if outstanding == 0:
                since = t
            outstanding += 1
        elif kind == -1:
            if since is not None and t - since > best:
                best, best_at = t - since, since
            outstanding -= 1
            since = t if outstanding else None
    if outstanding and since is not None and end - since > best:
        best, best_at = end - since, since
    return best, best_at


def result_times(sent: Iterable[Sent], first_completion: Mapping[str, float]) -> dict[str, list[float]]:
    """Seconds from sending to the first terminal result, per kind of request (those that have one): a lane
    starved behind another shows here (the batch lane's ingest records once waited minutes in a soak)."""
    out: dict[str, list[float]] = {}
    for s in sent:
        done = first_completion.get(s.request_id)
        if done is not None:
            out.setdefault(s.kind, []).append(max(0.0, done - s.sent_at))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class SyncCall:
    """One answered sync call (the last attempt of it): when it started and ended, and its HTTP status."""

    start: float
    end: float
    status: int


def split_latencies(calls: Iterable[SyncCall], faults: Sequence[FaultWindow]) -> tuple[list[float], list[float]]:
    """Latencies in ms of the 200 answers: (outside faults, during a fault). A call is during a fault when it
    overlaps one's window."""
    outside, during = [], []
    for c in calls:
        if c.status != 200:
            continue
        ms = (c.end - c.start) * 1000
        (during if any(c.start < f.end and c.end > f.start for f in faults) else outside).append(ms)
    return outside, during


def recovery_times(faults: Sequence[FaultWindow], completions: Iterable[float]) -> list[float | None]:
    """Per fault, seconds from its end to the first result completed after it (None: none came)."""
    done = sorted(completions)
    out: list[float | None] = []
    for f in faults:
        after = next((t for t in done if t >= f.end), None)
        out.append(None if after is None else after - f.end)
    return out


@dataclass
class Summary:
    reconciliation: Reconciliation
    faults: list[FaultWindow]
    recoveries: list[float | None]
    stall_s: float
    latency_outside_ms: list[float]
    latency_during_ms: list[float]
    refused: dict[int, int]  # HTTP status (503, 429) -> answers the load generator retried
    sync_errors: dict[str, int]  # other failures of the sync calls (not requests: they have no id)
    jobs: list[dict[str, Any]]  # {job_id, total, status, counts, paged}
    wall_s: float
    lost_detail: list[str] = field(default_factory=list)
    lag_end: dict[str, int] | None = None  # consumer group (without the prefix) -> records not committed
    stall_from_s: float | None = None  # when the longest stall began, seconds after the load started
    health_ms: dict[str, list[float]] = field(default_factory=dict)  # /livez, /readyz -> answer times (200s)
    health_failed: dict[str, int] = field(default_factory=dict)  # probes not answered 200 within 2 s
    result_s: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds from sent to first result

    def jobs_ok(self) -> bool:
        return all(j.get("status") == "COMPLETED" and j.get("done") == j.get("total") == j.get("paged")
                   for j in self.jobs)

    @property
    def passed(self) -> bool:
        rec = self.reconciliation
        return not rec.lost and not rec.duplicated and self.jobs_ok()


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def _ms2(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def format_summary(s: Summary) -> str:
    rec = s.reconciliation
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(rec.sent_by_kind.items()))
    statuses = ", ".join(f"{k} {n}" for k, n in sorted(rec.statuses.items()))
    lines = [
        f"requests sent: {rec.sent} ({kinds}); terminal results: {statuses or 'none'}",
        f"lost: {len(rec.lost)}",
        f"duplicated: {len(rec.duplicated)}",
        f"redelivered copies (online, at-least-once): {rec.redelivered_copies}",
        f"longest stall: {s.stall_s:.1f}s"
        + ("" if s.stall_from_s is None else f" (from {s.stall_from_s:+.0f}s)"),
        f"sync latency outside faults: P50 {_ms(percentile(s.latency_outside_ms, 0.5))} "
        f"P99 {_ms(percentile(s.latency_outside_ms, 0.99))} (n={len(s.latency_outside_ms)}); during faults: "
        f"P50 {_ms(percentile(s.latency_during_ms, 0.5))} P99 {_ms(percentile(s.latency_during_ms, 0.99))} "
        f"(n={len(s.latency_during_ms)})",
        "sync calls answered 503/429 and retried: "
        + (", ".join(f"{code} x{n}" for code, n in sorted(s.refused.items())) or "none"),
        "sync call errors (no request id): "
        + (", ".join(f"{k} x{n}" for k, n in sorted(s.sync_errors.items())) or "none"),
    ]
    for kind, times in sorted(s.result_s.items()):
        lines.append(f"time to result, {kind}: P50 {percentile(times, 0.5):.1f}s P99 {percentile(times, 0.99):.1f}s "
                     f"max {max(times):.1f}s (n={len(times)})")
    for path in sorted(set(s.health_ms) | set(s.health_failed)):
        times = s.health_ms.get(path, [])
        lines.append(f"health {path}: P50 {_ms2(percentile(times, 0.5))} P99 {_ms2(percentile(times, 0.99))} "
                     f"max {_ms2(max(times, default=None))} (n={len(times)}; not 200 within 2s: "
                     f"{s.health_failed.get(path, 0)})")
    for job in s.jobs:
        lines.append(f"job {job.get('job_id')}: {job.get('status')} {job.get('done')}/{job.get('total')} "
                     f"counts {job.get('counts')} paged {job.get('paged')}")
    for f, rec_s in zip(s.faults, s.recoveries, strict=True):
        took = f.end - f.start
        back = "no result after it" if rec_s is None else f"first result {rec_s:.1f}s after"
        lines.append(f"fault {f.label}: {took:.1f}s{f' ({f.detail})' if f.detail else ''}; recovered: {back}")
    if s.lag_end is not None:
        behind = ", ".join(f"{g} {n}" for g, n in sorted(s.lag_end.items()) if n)
        lines.append(f"consumer lag at the end: {sum(s.lag_end.values())}" + (f" ({behind})" if behind else ""))
    lines += s.lost_detail
    lines.append(f"drill wall time: {s.wall_s:.0f}s; verdict: {'PASS' if s.passed else 'FAIL'}")
    return "\n".join(lines)


def describe_losses(rec: Reconciliation, sent: Iterable[Sent], faults: Sequence[FaultWindow], t0: float,
                    on_dlq: Mapping[str, Sequence[str]], api: Mapping[str, str], limit: int = 50) -> list[str]:
    """One line per lost or duplicated request (at most ``limit`` of each): its kind, when it was sent, the
    faults around it (from 5 s before a fault to 30 s after it), the DLQ topics holding it (the stage where it
    stopped) and what `GET /v1/requests/{id}` says of it."""
    by_id = {s.request_id: s for s in sent}
    lines = []
    for rid in rec.lost[:limit]:
        s = by_id[rid]
        near = [f.label for f in faults if f.start - 5 <= s.sent_at <= f.end + 30]
        where = ", ".join(on_dlq.get(rid, ())) or "no"
        lines.append(f"  lost {s.kind} {rid}: sent at +{s.sent_at - t0:.1f}s near faults [{', '.join(near) or 'none'}]"
                     f"; on DLQ: {where}" + (f"; API: {api[rid]}" if rid in api else ""))
    for rid in rec.duplicated[:limit]:
        s = by_id[rid]
        lines.append(f"  duplicated {s.kind} {rid} (lane {s.lane}), sent at +{s.sent_at - t0:.1f}s")
    return lines


# ---------------------------------------------------------------------------------------------- soak


def rss_growth(samples: Sequence[tuple[float, int]], window_s: float = 300.0) -> float | None:
    """Growth of one process's RSS: the mean of its last ``window_s`` over the mean of its first, minus one.

    Samples are (time, bytes); a run shorter than two windows compares its first and last fifths. None with
    fewer than two samples."""
    if len(samples) < 2:
        return None
    t0, t1 = samples[0][0], samples[-1][0]
    span = t1 - t0
    window = window_s if span >= 2 * window_s else span / 5
    first = [b for t, b in samples if t <= t0 + window] or [samples[0][1]]
    last = [b for t, b in samples if t >= t1 - window] or [samples[-1][1]]
    base = sum(first) / len(first)
    return (sum(last) / len(last)) / base - 1 if base else None


def rss_late_growth(samples: Sequence[tuple[float, int]], window_s: float = 300.0) -> float | None:
    """Growth over the run's second half only (the window ending at the midpoint against the last window): a
    process that grew while it warmed up and then held still shows ~0 here; one that leaks shows about half its
    whole-run growth. None when the run is too short for two windows in each half."""
    if len(samples) < 2:
        return None
    t0, t1 = samples[0][0], samples[-1][0]
    mid = (t0 + t1) / 2
    if mid - t0 < 2 * window_s:
        return None
    middle = [b for t, b in samples if mid - window_s <= t <= mid]
    last = [b for t, b in samples if t >= t1 - window_s]
    if not middle or not last:
        return None
    base = sum(middle) / len(middle)
    return (sum(last) / len(last)) / base - 1 if base else None


# ---------------------------------------------------------------------------------------------- loopback


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def non_loopback(addresses: Mapping[str, str]) -> list[str]:
    """The named addresses ('host:port', 'scheme://host:port/...', 'host') whose host is not loopback."""
    bad = []
    for name, address in addresses.items():
        rest = address.split("://", 1)[-1].split("/", 1)[0]
        hosts = [h.rsplit(":", 1)[0] if h.count(":") == 1 or h.startswith("[") else h for h in rest.split(",")]
        if not all(is_loopback(h) for h in hosts):
            bad.append(f"{name}={address}")
    return bad
