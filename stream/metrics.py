"""The runtime's Prometheus metrics, created once at import, labelled by stage/topic/lane."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECORDS_IN = Counter("detectflow_records_in_total", "Records consumed", ["stage", "lane"])
RECORDS_OUT = Counter("detectflow_records_out_total", "Records finished, by outcome",
                      ["stage", "lane", "outcome"])  # outcome: ok | retried | rejected | failed
BATCH_SIZE = Histogram("detectflow_batch_size", "Records per processed batch", ["stage"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
PROCESS_SECONDS = Histogram("detectflow_process_seconds", "Time in the stage's process() per batch", ["stage"],
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
RECORD_AGE_SECONDS = Histogram("detectflow_record_age_seconds",
                               "End-to-end age of a record when its stage finished it (now - submitted_at)",
                               ["stage", "lane"],
                               buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
HOP_SECONDS = Histogram("detectflow_hop_seconds",
                        "Time from a record's produce (its CreateTime) to its stage polling it: the hop's "
                        "transport and queueing", ["stage", "lane"],
                        buckets=(.001, .0025, .005, .0075, .01, .015, .025, .05, .1, .25, .5, 1, 2.5, 10))
LOOP_SECONDS = Histogram("detectflow_loop_seconds", "Time per batch in each phase of the runtime loop",
                         ["stage", "phase"],  # decode | deliver (produce + flush + commit, or the transaction)
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
CONSUMER_LAG = Gauge("detectflow_consumer_lag", "High watermark minus position", ["stage", "topic", "partition"])
RETRIES = Counter("detectflow_retries_total", "Transient failures retried", ["stage", "path"])  # backoff | topic
DLQ = Counter("detectflow_dlq_total", "Records dead-lettered", ["stage", "reason"])
LATE_REPLIES = Counter("detectflow_late_replies_total", "Replies that arrived after their waiter gave up")
PAUSED_BATCH = Gauge("detectflow_batch_lane_paused", "1 while batch partitions are paused for online work",
                     ["stage"])
BATCH_TURNS = Counter("detectflow_batch_lane_turns_total", "Turns given to the batch lane after it waited "
                      "batch_max_wait_ms behind an online backlog", ["stage"])


def serve(port: int) -> int:
    """Serve /metrics on 127.0.0.1:port (0 picks a free port). Returns the port."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr="127.0.0.1")
    return int(server.server_port)
