"""Metrics of the pipeline stages (the runtime's own are in stream/metrics.py), created once at import."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CACHE = Counter("detectflow_result_cache_total", "Result cache lookups", ["outcome"])  # hit | miss | error | skipped
INFECTED = Counter("detectflow_infected_total", "Images rejected by the virus scan")
REJECTED = Counter("detectflow_rejected_total", "Images rejected by preprocess, by code", ["code"])
INFERENCE_BATCH = Histogram("detectflow_inference_batch_size", "Images per model run", ["model", "version"],
                            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
INFERENCE_SECONDS = Histogram("detectflow_inference_seconds", "Model run time per batch", ["model", "version"],
                              buckets=(.005, .01, .025, .05, .1, .2, .4, .8, 1.6, 3.2, 6.4))
DEADLINE_DROPS = Counter("detectflow_deadline_exceeded_total", "Records dropped because their deadline had passed",
                         ["stage"])
MODEL_READY = Gauge("detectflow_model_ready", "1 when a model version is loaded and warmed up",
                    ["model", "version", "provider"])
DETECTIONS = Histogram("detectflow_detections_per_image", "Detections per image", ["model"],
                       buckets=(0, 1, 2, 5, 10, 20, 50, 100, 300))

# Model lifecycle (processors/inference.py, processors/shadow.py, processors/monitor.py)
MODEL_LOAD_FAILURES = Counter("detectflow_model_load_failures_total", "Model versions that failed to load or warm up",
                              ["model", "version"])
ROUTED = Counter("detectflow_routed_total", "Requests routed to a model version by the registry's routing",
                 ["model", "version", "role"])  # role: production | canary | pinned
CANARY_ROLLBACKS = Counter("detectflow_canary_rollbacks_total", "Canaries rolled back by the guardrails",
                           ["model", "version", "cause"])  # cause: error_rate | latency
GUARD_ERROR_RATE = Gauge("detectflow_guardrail_error_rate", "FAILED share of results in the guardrail window",
                         ["model", "version"])
GUARD_P95_MS = Gauge("detectflow_guardrail_p95_ms", "P95 model latency (ms) in the guardrail window",
                     ["model", "version"])
# outcome: matched | production_only | shadow_only
SHADOW_MATCHES = Counter("detectflow_shadow_detections_total",
                         "Production/shadow detection agreement at IoU 0.5, per class",
                         ["model", "shadow_version", "class_name", "outcome"])
SHADOW_SCORE_DELTA = Histogram("detectflow_shadow_score_delta", "|score delta| of matched production/shadow pairs",
                               ["model", "shadow_version"], buckets=(.001, .005, .01, .02, .05, .1, .2, .5))
SHADOW_LATENCY_MS = Histogram("detectflow_shadow_model_ms", "Per-image model latency, production and shadow",
                              ["model", "version", "side"],
                              buckets=(5, 10, 20, 40, 60, 80, 120, 160, 240, 320, 640, 1280))
SHADOW_UNPAIRED = Counter("detectflow_shadow_unpaired_total",
                          "Results dropped from the pairing buffer before their other half arrived", ["model"])
SHADOW_SKIPPED = Counter("detectflow_shadow_skipped_total",
                         "Records the shadow could not run (never affects a request)", ["reason"])
# Governance (processors/governance.py): results of deleted images superseded by IMAGE_DELETED, per stage;
# images a tenant's content policy flagged for review.
DELETED_DROPPED = Counter("detectflow_deleted_image_results_total",
                          "Results of images deleted before they were stored, ended as IMAGE_DELETED", ["stage"])
FLAGGED = Counter("detectflow_review_flagged_total", "Images flagged for review by a tenant's content policy")
# Tenant-bound ingestion (stream/ingest.py): records on a tenant's ingest topic naming another tenant.
TENANT_MISMATCH = Counter("detectflow_tenant_mismatch_total",
                          "Submissions refused because their tenant field disagreed with their ingest topic")
