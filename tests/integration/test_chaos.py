"""The chaos drill's short form on the real stack (infra/chaos_run.py, docs/reliability.md): a role killed, a
service paused, a service restarted under a mixed load, and still every request has exactly one terminal
result and the job completes. It restarts stack services, so it runs with the `restart` tests, last."""

from __future__ import annotations

import pytest

from config import StackSettings
from infra.chaos_drill import KILL_ROLE, PAUSE, RESTART, format_summary
from infra.chaos_run import ChaosOptions, run_drill
from infra.stack import manager


@pytest.mark.restart
def test_short_drill_loses_nothing_and_answers_each_request_once(stack: StackSettings) -> None:
    before = {h.name for h in manager.status(stack) if h.healthy}
    # Seed 1: kill preprocess, pause Cassandra 24 s, restart MinIO (infra/chaos_drill.py plan_faults), in 110 s of load.
    summary = run_drill(stack, ChaosOptions(duration_s=110, seed=1, job_images=40, drain_s=150))
    report = format_summary(summary)
    kinds = [w.label.split()[0] for w in summary.faults]
    assert kinds == [KILL_ROLE, PAUSE, RESTART], report
    assert all(w.detail != "not running: skipped" for w in summary.faults), report
    rec = summary.reconciliation
    assert set(rec.sent_by_kind) == {"sync", "job", "ingest"} and rec.sent_by_kind["job"] == 40, report
    assert rec.lost == [], report
    assert rec.duplicated == [], report
    assert summary.jobs and summary.jobs_ok(), report
    assert summary.passed, report
    # The stack as the drill found it.
    assert {h.name for h in manager.status(stack) if h.healthy} == before
