"""recorder: the DetectionResults on `detections` that no stage stored are stored in Cassandra.

postprocess stores its own results (OK, not from the cache) before publishing them; results that
other stages close (REJECTED by scan or preprocess, FAILED after retries, DEADLINE_EXCEEDED, cache
hits) reach Cassandra through this sink, with the same idempotent upserts, so `GET
/v1/requests/{id}` and job pages see every outcome. Once a batch is stored, the job tracker
(processors/jobs.py) announces the jobs it completed on `jobs.events`. A result of an image deleted
before it is stored (processors/governance.py) is stored as REJECTED IMAGE_DELETED instead, so its
request and its job still end.

A TENANT_MISMATCH result (a tenant's ingest record naming another tenant, refused by scan: stream/ingest.py)
is audited here too, since the recorder reads every result anyway and scan may not write the audit log: its
AuditEvent goes to Cassandra (`audit_log`, `GET /v1/audit`) with the batch's results, and to `audit`. The
event id derives from the request, so a redelivered result rewrites the same row and repeats the same event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from processors.governance import Tombstones, store_unless_deleted
from processors.jobs import JobTracker
from stream import ingest
from stream.errors import TransientError
from stream.records import Failure, Outcome, Output, Record
from stream.topics import detections_topic


class Results(Protocol):
    def save_results(self, results: Sequence[Mapping[str, Any]], *, supersede: bool = False, index: bool = True,
                     cache: Sequence[tuple[Any, Mapping[str, Any]]] = ()) -> None: ...


class AuditWriter(Protocol):
    """stream/cassandra.py AuditLog: idempotent rows keyed by event id; TransientError when Cassandra fails."""

    def write(self, events: Sequence[Mapping[str, Any]]) -> None: ...


def stored_by_postprocess(result: Mapping[str, Any]) -> bool:
    """postprocess stores every OK result it makes before publishing it; storing it again is waste."""
    return result.get("status") == "OK" and not result.get("cache_hit")


class RecorderStage:
    name = "recorder"
    input_event = "DetectionResult"
    emits_terminal_results = False

    def __init__(self, results: Results, prefix: str = "", jobs: JobTracker | None = None,
                 governance: Tombstones | None = None, *, audit: AuditWriter | None = None):
        self.results = results
        self.prefix = prefix
        self.jobs = jobs
        self.governance = governance
        self.audit = audit  # None (tests, benchmarks): TENANT_MISMATCH results are stored but not audited

    def input_topics(self) -> list[str]:
        return [detections_topic(self.prefix)]

    def process(self, batch: list[Record]) -> list[Outcome]:
        todo = [rec.value for rec in batch if not stored_by_postprocess(rec.value)]
        refusals = [ingest.audit_event(self.prefix, rec.value) if self.audit is not None else None for rec in batch]
        try:
            if todo and self.governance is not None:
                store_unless_deleted(self.results, self.governance, todo)
            elif todo:
                self.results.save_results(todo)
            if self.audit is not None and any(refusals):
                self.audit.write([e for e in refusals if e is not None])
            done = self.jobs.completed([rec.value for rec in batch]) if self.jobs is not None else {}
        except TransientError as exc:
            return [Failure(exc) for _ in batch]
        outcomes: list[Outcome] = []
        for rec, refusal in zip(batch, refusals, strict=True):
            # A completed job's event rides with the first of its records in the batch.
            event = done.pop((rec.value.get("tenant"), rec.value.get("job_id")), None)
            outs: list[Output] = [event] if event is not None else []
            if refusal is not None:
                outs.append(Output(f"{self.prefix}audit", refusal["tenant"], refusal, "AuditEvent"))
            outcomes.append(outs)
        return outcomes
