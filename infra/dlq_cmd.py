"""`detectflow dlq list|show|redrive`: the dead letters on the `<prefix>*.dlq` topics, and sending them back.

A letter is a DeadLetter record (schemas/io.detectflow.events.DeadLetter.avsc) a stage wrote when it gave up on
a record (stream/runtime.py): the original key, value bytes and headers, with the error and the provenance.

`redrive` produces each selected letter's original value, byte for byte, back onto the topic it was read from
(a retry record goes back to the stage input it came from: its x-origin-topic header), with its headers minus
the retry and provenance ones, plus ``x-redriven-from: <dlq topic>:<partition>:<offset>``. A letter is redriven
at most once: each DLQ topic has a consumer group whose committed offset marks how far it was redriven, committed
only after the redriven records are flushed (a crash between the two redrives those letters again on the next
run: at-least-once, as every hop is). Letters that `--since` passes over stay behind the mark. Runs as the
operator's Kafka principal (the settings' `admin`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from stream import headers as H
from stream.serde import AvroSerde, SerdeError, epoch_ms

REDRIVEN_FROM = H.REDRIVEN_FROM
# What a redriven record does not carry on: the retry bookkeeping and the dead-letter provenance.
DROPPED_HEADERS = frozenset({H.ATTEMPT, H.NOT_BEFORE_MS, H.ORIGIN_TOPIC, H.FIRST_FAILED_MS, H.ERROR_CLASS,
                             H.ERROR_MESSAGE, H.DLQ_TOPIC, H.DLQ_PARTITION, H.DLQ_OFFSET})
DLQ_SUFFIX = ".dlq"
RETRY_SUFFIX = ".retry"
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class DlqError(RuntimeError):
    """A DLQ command could not do what was asked (no such topic or letter, Kafka refused, a delivery failed)."""


@dataclass(frozen=True)
class Letter:
    dlq_topic: str
    partition: int
    offset: int
    stage: str
    topic: str  # read from (may be a retry topic)
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None  # the original bytes (None when read for listing only)
    value_size: int
    headers: dict[str, bytes]  # the original record's
    letter_headers: dict[str, bytes]  # the letter's own Kafka headers (provenance on top of the original's)
    error_class: str
    error_message: str
    attempts: int
    request_id: str | None
    failed_at_ms: int

    @property
    def id(self) -> str:
        return f"{self.dlq_topic}:{self.partition}:{self.offset}"

    @property
    def target(self) -> str:
        """Where a redrive sends it: the topic it was read from; for a retry record, the input it came from."""
        if not self.topic.endswith(RETRY_SUFFIX):
            return self.topic
        origin = H.text(self.headers, H.ORIGIN_TOPIC)
        return origin or self.topic[: -len(RETRY_SUFFIX)]

    def redrive_headers(self) -> list[tuple[str, bytes]]:
        kept = [(k, v) for k, v in self.headers.items() if k not in DROPPED_HEADERS and k != REDRIVEN_FROM]
        return [*kept, (REDRIVEN_FROM, self.id.encode())]


def parse_since(raw: str, now_ms: int | None = None) -> int:
    """``--since``: a duration back from now (90s, 30m, 2h, 7d) or an ISO 8601 time (UTC unless it says), as
    epoch millis."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    m = _DURATION.match(raw)
    if m:
        return now - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    try:
        when = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise DlqError(f"--since {raw!r}: give a duration (90s, 30m, 2h, 7d) or an ISO 8601 time") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def redrive_group(prefix: str, dlq_topic: str) -> str:
    """The consumer group whose committed offsets mark how far ``dlq_topic`` was redriven (under the deployment's
    prefix, so a deployment's groups go with it)."""
    return f"{prefix}detectflow.redrive.{dlq_topic.removeprefix(prefix)}"


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_letter(msg: Any, serde: AvroSerde, *, keep_value: bool) -> Letter:
    d = serde.decode(msg.value(), "DeadLetter")
    value = d["value"] or b""
    return Letter(
        dlq_topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), stage=d["stage"], topic=d["topic"],
        source_partition=d["partition"], source_offset=d["offset"], key=d["key"],
        value=value if keep_value else None, value_size=len(value), headers=dict(d["headers"] or {}),
        letter_headers=H.to_dict(msg.headers()), error_class=d["error_class"], error_message=d["error_message"],
        attempts=d["attempts"], request_id=d["request_id"], failed_at_ms=epoch_ms(d["failed_at"]) or 0)


class DeadLetters:
    """Reads the DLQ topics of one deployment prefix; redrives their letters."""

    def __init__(self, kafka: dict[str, Any], serde: AvroSerde, prefix: str, *, max_message_bytes: int,
                 timeout_s: float = 30.0):
        self.kafka = kafka
        self.serde = serde
        self.prefix = prefix
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s

    def _consumer(self, group: str | None = None) -> Consumer:
        # Auto-commit off: only a redrive commits, and only after its records are flushed.
        return Consumer({**self.kafka, "group.id": group or f"{self.prefix}detectflow.dlq-read.{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "fetch.max.bytes": self.max_message_bytes + 1024 * 1024, "log_level": 3})

    def topics(self, name: str | None = None) -> list[str]:
        """The DLQ topics of the prefix, or the one ``name`` means (a DLQ topic, or the topic whose DLQ it is;
        with or without the prefix)."""
        consumer = self._consumer()
        try:
            existing = set(consumer.list_topics(timeout=self.timeout_s).topics)
        except KafkaException as exc:
            raise DlqError(f"cannot list topics: {exc}") from exc
        finally:
            consumer.close()
        if name is None:
            return sorted(t for t in existing if t.startswith(self.prefix) and t.endswith(DLQ_SUFFIX))
        wanted = name if name.endswith(DLQ_SUFFIX) else name + DLQ_SUFFIX
        for candidate in (wanted, self.prefix + wanted):
            if candidate in existing:
                return [candidate]
        raise DlqError(f"no DLQ topic {wanted!r} (nor {self.prefix + wanted!r})")

    def _partitions(self, consumer: Consumer, topic: str) -> list[int]:
        meta = consumer.list_topics(topic, timeout=self.timeout_s).topics[topic]
        if meta.error is not None:
            raise DlqError(f"{topic}: {meta.error}")
        return sorted(meta.partitions)

    def marks(self, consumer: Consumer, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """Per partition, the offset below which the letters were redriven (-1: none yet)."""
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=self.timeout_s)
        return {tp.partition: tp.offset if tp.offset >= 0 else -1 for tp in committed}

    def read(self, topic: str, *, since_ms: int | None = None, from_marks: bool = False, keep_values: bool = False,
             group: str | None = None) -> tuple[list[Letter], dict[int, int], dict[int, int]]:
        """The letters of ``topic`` (from the redrive marks with ``from_marks``, else from the start; from
        ``since_ms`` on), the marks, and per partition the offset after the last record read."""
        consumer = self._consumer(group or redrive_group(self.prefix, topic))
        try:
            parts = self._partitions(consumer, topic)
            marks = self.marks(consumer, topic, parts)
            starts: dict[int, int] = {}
            ends: dict[int, int] = {}
            for p in parts:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=self.timeout_s)
                start = max(low, marks[p]) if from_marks and marks[p] >= 0 else low
                if since_ms is not None:  # skip what was written before (a letter is written when it fails)
                    found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms)], timeout=self.timeout_s)
                    start = max(start, found[0].offset if found[0].offset >= 0 else high)
                starts[p], ends[p] = start, high
            letters = list(self._consume(consumer, topic, starts, ends, keep_values))
        except KafkaException as exc:
            raise DlqError(f"{topic}: {exc}") from exc
        finally:
            consumer.close()
        if since_ms is not None:
            letters = [x for x in letters if x.failed_at_ms >= since_ms]
        return letters, marks, ends

    def _consume(self, consumer: Consumer, topic: str, starts: dict[int, int], ends: dict[int, int],
                 keep_values: bool) -> Iterator[Letter]:
        pending = {p for p in starts if starts[p] < ends[p]}
        if not pending:
            return
        consumer.assign([TopicPartition(topic, p, starts[p] if starts[p] >= 0 else OFFSET_BEGINNING)
                         for p in pending])
        deadline = time.monotonic() + self.timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise DlqError(f"{topic}: partitions {sorted(pending)} not read to their end in {self.timeout_s:.0f}s")
            for msg in consumer.consume(500, 0.5):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise DlqError(f"{topic}: {msg.error()}")
                p = msg.partition()
                if p in pending and msg.offset() < ends[p]:
                    try:
                        yield parse_letter(msg, self.serde, keep_value=keep_values)
                    except SerdeError as exc:
                        print(f"{topic}:{p}:{msg.offset()}: not a DeadLetter record, passed over ({exc})",
                              file=sys.stderr)
                if p in pending and msg.offset() + 1 >= ends[p]:
                    pending.discard(p)
            # A partition whose last offsets are transaction markers never delivers them: done when its position
            # reaches the end.
            for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)

    def letter(self, letter_id: str) -> tuple[Letter, bool]:
        """One letter by its id (``<dlq topic>:<partition>:<offset>``), and whether it was redriven."""
        try:
            topic, part, off = letter_id.rsplit(":", 2)
            partition, offset = int(part), int(off)
        except ValueError as exc:
            raise DlqError(f"{letter_id!r} is not a letter id (<dlq topic>:<partition>:<offset>)") from exc
        consumer = self._consumer(redrive_group(self.prefix, topic))
        try:
            if partition not in self._partitions(consumer, topic):
                raise DlqError(f"{topic} has no partition {partition}")
            mark = self.marks(consumer, topic, [partition])[partition]
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=self.timeout_s)
            if not low <= offset < high:
                raise DlqError(f"{topic}:{partition} holds offsets {low}..{high - 1}, not {offset}")
            found = [x for x in self._consume(consumer, topic, {partition: offset}, {partition: offset + 1}, True)
                     if x.offset == offset]
        except KafkaException as exc:
            raise DlqError(f"{topic}: {exc}") from exc
        finally:
            consumer.close()
        if not found:
            raise DlqError(f"no DeadLetter at {letter_id}")
        return found[0], offset < mark

    def redrive(self, topic: str, *, since_ms: int | None = None, dry_run: bool = False) -> list[Letter]:
        """Send the letters after the mark (from ``since_ms`` on) back to their topics; then move the mark past
        every letter read. With ``dry_run``, only say which."""
        group = redrive_group(self.prefix, topic)
        letters, _marks, ends = self.read(topic, since_ms=since_ms, from_marks=True, keep_values=not dry_run,
                                          group=group)
        if dry_run:
            return letters
        failures: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(f"{msg.topic()}: {err}")

        producer = Producer({**self.kafka, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                             "message.max.bytes": self.max_message_bytes + 64 * 1024, "log_level": 3})
        for x in letters:
            producer.produce(x.target, key=x.key, value=x.value, headers=x.redrive_headers(), on_delivery=delivered)
            producer.poll(0)
        left = producer.flush(self.timeout_s)
        if left or failures:
            detail = "; ".join(failures[:3])
            raise DlqError(f"{topic}: {left} record(s) undelivered, {len(failures)} failed ({detail}); the redrive "
                           "mark did not move, so a rerun sends these letters again")
        consumer = self._consumer(group)
        try:  # Only now, with every record durable on its topic, does the mark move.
            consumer.commit(offsets=[TopicPartition(topic, p, end) for p, end in ends.items()], asynchronous=False)
        except KafkaException as exc:
            raise DlqError(f"{topic}: redriven, but the mark could not be committed ({exc}); a rerun would send "
                           "these letters again") from exc
        finally:
            consumer.close()
        return letters


# ---------------------------------------------------------------------------------------------- the CLI


def _trim(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def list_line(x: Letter, redriven: bool) -> str:
    return (f"{x.id:<44} {iso(x.failed_at_ms)} {x.stage:<11} {x.topic}:{x.source_partition}:{x.source_offset} "
            f"{x.request_id or '-'} {x.error_class} {_trim(x.error_message, 80)}"
            + ("  [redriven]" if redriven else ""))


def _header_value(v: bytes) -> str:
    try:
        text = v.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(v)} bytes>"
    return _trim(text, 200) if text.isprintable() else f"<{len(v)} bytes>"


def show_text(x: Letter, redriven: bool) -> str:
    schema = (f", Confluent-framed schema id {int.from_bytes(x.value[1:5], 'big')}"
              if x.value and len(x.value) >= 5 and x.value[0] == 0 else "")
    lines = [
        f"letter       {x.id}", f"failed at    {iso(x.failed_at_ms)}", f"stage        {x.stage}",
        f"read from    {x.topic}:{x.source_partition}:{x.source_offset}", f"redrive to   {x.target}",
        f"request id   {x.request_id or '-'}", f"key          {_header_value(x.key) if x.key is not None else '-'}",
        f"attempts     {x.attempts}", f"error        {x.error_class}: {x.error_message}",
        f"value        {x.value_size} bytes{schema} (not shown)", f"redriven     {'yes' if redriven else 'no'}",
        "headers (original):", *(f"  {k}: {_header_value(v)}" for k, v in sorted(x.headers.items())),
        "headers (letter):", *(f"  {k}: {_header_value(v)}" for k, v in sorted(x.letter_headers.items())),
    ]
    return "\n".join(lines)


def run_dlq(args: argparse.Namespace) -> int:
    from config import StreamSettings, kafka_client

    stream = StreamSettings.from_env()
    dlq = DeadLetters(kafka_client(stream), AvroSerde.from_url(stream.registry_url, stream.tls_ca_file),
                      stream.topic_prefix, max_message_bytes=stream.max_message_bytes)
    try:
        if args.action == "show":
            letter, redriven = dlq.letter(args.letter)
            print(show_text(letter, redriven))
            return 0
        since = parse_since(args.since) if args.since else None
        topics = dlq.topics(args.topic)
        if args.action == "list":
            count = 0
            for topic in topics:
                letters, marks, _ = dlq.read(topic, since_ms=since)
                for x in letters:
                    print(list_line(x, x.offset < marks.get(x.partition, -1)))
                count += len(letters)
            print(f"{count} letter(s) on {len(topics)} DLQ topic(s)", file=sys.stderr)
            return 0
        total = 0
        for topic in topics:
            letters = dlq.redrive(topic, since_ms=since, dry_run=args.dry_run)
            for x in letters:
                print(f"{'would redrive' if args.dry_run else 'redrove'} {x.id} -> {x.target} "
                      f"({x.value_size} bytes, request {x.request_id or '-'})")
            total += len(letters)
        print(f"{'would redrive' if args.dry_run else 'redrove'} {total} letter(s)"
              + (" (dry run: nothing produced, the marks did not move)" if args.dry_run else ""), file=sys.stderr)
        return 0
    except DlqError as exc:
        print(f"detectflow dlq: {exc}", file=sys.stderr)
        return 1


def add_cli(sub: Any) -> argparse.ArgumentParser:
    dq = sub.add_parser("dlq", help="list, show and redrive the dead letters on the *.dlq topics")
    dsub = dq.add_subparsers(dest="action", required=True)
    for name, text in (("list", "one line per letter"),
                       ("redrive", "produce the letters' original records back onto their topics, each once")):
        p = dsub.add_parser(name, help=text)
        p.add_argument("--topic", default=None, help="one DLQ topic (or the topic whose DLQ it is); default: all")
        p.add_argument("--since", default=None, metavar="DURATION_OR_ISO",
                       help="only letters written since then: 90s, 30m, 2h, 7d, or an ISO 8601 time")
        if name == "redrive":
            p.add_argument("--dry-run", action="store_true", help="print what would be redriven; produce nothing")
    sh = dsub.add_parser("show", help="one letter in full (headers, error, value size; never the image bytes)")
    sh.add_argument("letter", help="<dlq topic>:<partition>:<offset>, as `dlq list` prints it")
    return dq
