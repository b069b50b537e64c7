"""Metrics of the pipeline stages (the runtime's own are in stream/metrics.py), created once at import."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CACHE = Counter("detectflow_result_cache_total", "Result cache lookups", ["outcome"])  # hit | miss | error
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
