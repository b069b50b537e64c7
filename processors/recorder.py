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

Outages (Cassandra away, wholly or for some writes): each record has its own outcome. The records whose rows
were all written, whose image's tombstone was read and whose job was counted are done (committed); only the
others fail, with a TransientError, and the runtime retries them (its retry budget is time: a sink away for
minutes delays results, it does not lose them). Every write is an idempotent upsert, so retrying a record
rewrites the same rows. The job tracker rechecks jobs whose count failed on its own (processors/jobs.py), so a
job whose last result was stored still completes after its record's retries ran out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from processors.governance import IMAGE_DELETED, Tombstones, deleted_result, result_hidden
from processors.jobs import JobCheck, JobTracker
from stream import ingest
from stream.cassandra import WriteFailed
from stream.errors import TransientError
from stream.records import Failure, Outcome, Output, Record
from stream.topics import detections_topic


class Results(Protocol):
    def save_results(self, results: Sequence[Mapping[str, Any]], *, supersede: bool = False, index: bool = True,
                     cache: Sequence[tuple[Any, Mapping[str, Any]]] = ()) -> None: ...


class AuditWriter(Protocol):
    """stream/cassandra.py AuditLog: idempotent rows keyed by event id; TransientError when Cassandra fails
    (WriteFailed: only the events at its ``failed`` positions)."""

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
        if self.jobs is not None:
            self.jobs.start_rechecks()
        errors: dict[int, TransientError] = {}  # position in the batch -> why that record is retried
        todo = [i for i, rec in enumerate(batch) if not stored_by_postprocess(rec.value)]
        for j, exc in self._store([batch[i].value for i in todo]).items():
            errors[todo[j]] = exc
        refusals = [ingest.audit_event(self.prefix, rec.value) if self.audit is not None else None for rec in batch]
        audited = [i for i, e in enumerate(refusals) if e is not None]
        if self.audit is not None and audited:
            audit, events = self.audit, [e for e in refusals if e is not None]
            for j, exc in _each_failure(lambda: audit.write(events), len(events)).items():
                errors.setdefault(audited[j], exc)
        stored = [i for i in range(len(batch)) if i not in errors]
        check = self.jobs.check([batch[i].value for i in stored]) if self.jobs is not None else JobCheck()
        for i in stored:
            failed = check.failed.get(_job_of(batch[i]))
            if failed is not None:
                errors[i] = failed
        announced = self.jobs.announcements() if self.jobs is not None else []
        outcomes: list[Outcome] = []
        for i, (rec, refusal) in enumerate(zip(batch, refusals, strict=True)):
            if i in errors:
                outcomes.append(Failure(errors[i]))
                continue
            # A completed job's event rides with the first of its records in the batch; the events of jobs the
            # tracker's recheck completed ride with the first record that succeeds.
            event = check.events.pop(_job_of(rec), None)
            outs: list[Output] = [event] if event is not None else []
            outs += announced
            announced = []
            if refusal is not None:
                outs.append(Output(f"{self.prefix}audit", refusal["tenant"], refusal, "AuditEvent"))
            outcomes.append(outs)
        if announced and self.jobs is not None:
            self.jobs.requeue(announced)
        return outcomes

    def _store(self, results: list[dict[str, Any]]) -> dict[int, TransientError]:
        """Store what the recorder stores; per position in ``results``, the error of each result not (wholly)
        stored. With governance, like processors/governance.py store_unless_deleted, result by result: store,
        read the tombstones of the stored ones' images, supersede those of deleted images."""
        if not results:
            return {}
        failed = _each_failure(lambda: self.results.save_results(results), len(results))
        if self.governance is None:
            return failed
        kept = [i for i in range(len(results)) if i not in failed]
        if not kept:
            return failed
        try:
            stones = self.governance.tombstones([(results[i]["tenant"], results[i].get("image_sha256"))
                                                 for i in kept if results[i].get("tenant")])
        except TransientError as exc:
            return {**failed, **{i: exc for i in kept}}
        gone = [i for i in kept if result_hidden(results[i], stones) and results[i].get("error_code") != IMAGE_DELETED]
        if gone:
            superseding = [deleted_result(results[i]) for i in gone]
            for j, exc in _each_failure(lambda: self.results.save_results(superseding, supersede=True),
                                        len(gone)).items():
                failed[gone[j]] = exc
        return failed


def _job_of(rec: Record) -> tuple[str, str]:
    return (rec.value.get("tenant") or "", rec.value.get("job_id") or "")


def _each_failure(write: Callable[[], None], n: int) -> dict[int, TransientError]:
    """Run a write of ``n`` items: the positions it failed at (WriteFailed names them; any other TransientError
    fails all ``n``)."""
    try:
        write()
    except WriteFailed as exc:
        return dict.fromkeys(exc.failed, exc)
    except TransientError as exc:
        return dict.fromkeys(range(n), exc)
    return {}
