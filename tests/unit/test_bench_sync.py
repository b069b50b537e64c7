"""The pure parts of `detectflow bench sync`: distinct request bodies, level statistics, metric deltas, the
comparison with the plain server, cache-hit replays; and the plain server itself with a stand-in model."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from imaging.headers import read_header
from infra.bench_bodies import BenchError, distinct_bodies, reencode_jpeg, with_comment
from infra.bench_sync import (
    NO_RESPONSE,
    against_plain,
    histogram_quantile,
    parse_levels,
    replay_bodies,
    requests_for,
    server_figures,
    summarize,
)


def _png(seed: int, w: int = 64, h: int = 48) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_reencode_turns_any_sample_into_a_jpeg_of_the_same_size() -> None:
    jpeg = reencode_jpeg(_png(1))
    assert jpeg.startswith(b"\xff\xd8\xff")
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)


def test_a_comment_changes_the_bytes_but_not_the_pixels() -> None:
    jpeg = reencode_jpeg(_png(2))
    tagged = with_comment(jpeg, b"hello")
    assert tagged != jpeg
    assert tagged[2:4] == b"\xff\xfe" and tagged[4:6] == (7).to_bytes(2, "big")
    original = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR), original)
    with pytest.raises(ValueError):
        with_comment(b"\x89PNG....", b"x")


def test_distinct_bodies_have_distinct_sha256s_and_are_valid_jpegs() -> None:
    bases = [reencode_jpeg(_png(seed)) for seed in range(3)]
    bodies = distinct_bodies(bases, 50, "run1")
    assert len(bodies) == 50
    assert len({hashlib.sha256(b).hexdigest() for b in bodies}) == 50
    # Another run's bodies never collide with this run's.
    assert not {hashlib.sha256(b).digest() for b in bodies} & {hashlib.sha256(b).digest()
                                                              for b in distinct_bodies(bases, 50, "run2")}
    for body in bodies[:6]:
        header = read_header(body)  # the pipeline's own header reader accepts the comment segment
        assert (header.width, header.height) == (64, 48)
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ValueError):
        distinct_bodies([], 1, "x")


def test_summarize_percentiles_throughput_and_errors() -> None:
    ok = [(float(ms), 200) for ms in range(1, 101)]  # 1..100 ms
    errors = [(5.0, 503), (5.0, 503), (30000.0, 202), (1.0, NO_RESPONSE)]
    s = summarize(4, ok + errors, wall_s=10.0)
    assert s.requests == 104 and s.concurrency == 4
    assert s.p50_ms == pytest.approx(50.5)  # errors take no part in the latency figures
    assert s.p95_ms == pytest.approx(95.05)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.ok_per_s == pytest.approx(10.0)
    assert s.error_rate == pytest.approx(4 / 104)
    assert s.statuses == {NO_RESPONSE: 1, 200: 100, 202: 1, 503: 2}


def test_summarize_with_no_successes() -> None:
    s = summarize(1, [(3.0, 503)], wall_s=1.0)
    assert math.isnan(s.p50_ms) and math.isnan(s.mean_ms) and s.ok_per_s == 0 and s.error_rate == 1.0


def _hist(name: str, route: str, counts: dict[str, float], total_s: float) -> dict[str, float]:
    out = {f'{name}_bucket{{route="{route}",le="{le}"}}': v for le, v in counts.items()}
    out[f'{name}_count{{route="{route}"}}'] = counts["+Inf"]
    out[f'{name}_sum{{route="{route}"}}'] = total_s
    return out


def test_histogram_quantile_over_an_interval() -> None:
    name = "detectflow_http_request_seconds"
    before = _hist(name, "/v1/detect", {"0.1": 10, "0.2": 10, "0.5": 10, "+Inf": 10}, 0.5)
    # In the interval: 10 calls within 0.1-0.2 s, 10 within 0.2-0.5 s; another route must not count.
    after = {**_hist(name, "/v1/detect", {"0.1": 10, "0.2": 20, "0.5": 30, "+Inf": 30}, 6.0),
             **_hist(name, "/livez", {"0.1": 99, "0.2": 99, "0.5": 99, "+Inf": 99}, 1.0)}
    assert histogram_quantile(before, after, name, 50, route="/v1/detect") == pytest.approx(0.2)
    assert histogram_quantile(before, after, name, 75, route="/v1/detect") == pytest.approx(0.35)
    assert math.isnan(histogram_quantile(after, after, name, 50, route="/v1/detect"))
    beyond = _hist(name, "/v1/detect", {"0.1": 10, "0.2": 10, "0.5": 10, "+Inf": 20}, 60.0)
    assert histogram_quantile(before, beyond, name, 50, route="/v1/detect") == pytest.approx(0.5)


def test_server_figures_from_scrape_deltas() -> None:
    inf_before = {'detectflow_batch_size_count{stage="inference"}': 5.0,
                  'detectflow_batch_size_sum{stage="inference"}': 5.0,
                  'detectflow_process_seconds_count{stage="inference"}': 5.0,
                  'detectflow_process_seconds_sum{stage="inference"}': 0.5,
                  'detectflow_inference_batch_size_count{model="m",version="1"}': 5.0,
                  'detectflow_inference_batch_size_sum{model="m",version="1"}': 5.0,
                  'detectflow_inference_seconds_sum{model="m",version="1"}': 0.4}
    inf_after = {'detectflow_batch_size_count{stage="inference"}': 9.0,
                 'detectflow_batch_size_sum{stage="inference"}': 21.0,
                 'detectflow_process_seconds_count{stage="inference"}': 9.0,
                 'detectflow_process_seconds_sum{stage="inference"}': 1.3,
                 'detectflow_batch_size_sum{stage="scan"}': 1000.0,
                 'detectflow_inference_batch_size_count{model="m",version="1"}': 9.0,
                 'detectflow_inference_batch_size_sum{model="m",version="1"}': 21.0,
                 'detectflow_inference_seconds_sum{model="m",version="1"}': 1.0}
    name = "detectflow_http_request_seconds"
    gw_before = _hist(name, "/v1/detect", {"0.1": 0, "0.2": 0, "+Inf": 0}, 0.0)
    gw_after = _hist(name, "/v1/detect", {"0.1": 0, "0.2": 16, "+Inf": 16}, 2.4)
    f = server_figures(inf_before, inf_after, gw_before, gw_after)
    assert f["batches"] == 4 and f["mean_batch"] == pytest.approx(4.0)
    assert f["process_ms_per_batch"] == pytest.approx(200.0)
    assert f["model_runs"] == 4 and f["images_per_run"] == pytest.approx(4.0)
    assert f["model_ms_per_run"] == pytest.approx(150.0)
    assert f["gw_calls"] == 16 and f["gw_mean_ms"] == pytest.approx(150.0)
    assert f["gw_p50_ms"] == pytest.approx(150.0)
    idle = server_figures(inf_after, inf_after, gw_after, gw_after)
    assert idle["batches"] == 0 and math.isnan(idle["mean_batch"]) and math.isnan(idle["gw_p50_ms"])


def test_levels_and_requests_per_level() -> None:
    assert parse_levels("1, 4,16,64") == (1, 4, 16, 64)
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(ValueError):
            parse_levels(bad)
    assert [requests_for(level, 40) for level in (1, 4, 16, 64)] == [40, 40, 64, 256]


def test_detectflow_against_the_plain_server_per_level() -> None:
    flow = [summarize(1, [(150.0, 200)] * 10, wall_s=2.0), summarize(4, [(400.0, 200)] * 10, wall_s=1.0),
            summarize(64, [(900.0, 200)] * 10, wall_s=1.0)]
    plain = [summarize(1, [(50.0, 200)] * 10, wall_s=0.5), summarize(4, [(200.0, 200)] * 10, wall_s=0.5)]
    rows = against_plain(flow, plain)
    assert [level for level, _, _ in rows] == [1, 4]  # a level only one side ran is left out
    assert rows[0][1] == pytest.approx(0.25) and rows[0][2] == pytest.approx(100.0)
    assert rows[1][1] == pytest.approx(0.5) and rows[1][2] == pytest.approx(200.0)
    idle = against_plain(flow[:1], [summarize(1, [(1.0, 503)], wall_s=1.0)])
    assert math.isnan(idle[0][1])


def test_cache_replays_resend_bodies_already_answered() -> None:
    answered = [b"a", b"b", b"c"]
    assert replay_bodies(answered, 7) == [b"a", b"b", b"c", b"a", b"b", b"c", b"a"]
    assert replay_bodies(answered, 2) == [b"a", b"b"]
    with pytest.raises(BenchError):
        replay_bodies([], 4)


def test_the_plain_server_answers_detections_as_json_and_rejects_what_does_not_decode() -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from infra.bench_plain import DETECT_ROUTE, build_app, command
    from model_store.serving.boxes import Detection

    class StandIn:  # the model: records what it was given, answers one box
        def __init__(self) -> None:
            self.shapes: list[tuple[int, ...]] = []

        def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
            self.shapes.extend(img.shape for img in images)
            return [[Detection(0, "person", 0.9, (1.0, 2.0, 3.0, 4.0))] for _ in images]

    model = StandIn()

    async def calls() -> None:
        async with TestClient(TestServer(build_app(model))) as client:
            resp = await client.post(DETECT_ROUTE, data=reencode_jpeg(_png(7)))
            assert resp.status == 200
            assert await resp.json() == {"detections": [{"class_id": 0, "class_name": "person", "score": 0.9,
                                                         "box": [1.0, 2.0, 3.0, 4.0]}]}
            assert (await client.post(DETECT_ROUTE, data=b"not an image")).status == 400
            assert (await client.get("/readyz")).status == 200

    asyncio.run(calls())
    assert model.shapes == [(48, 64, 3)]  # decoded once, one image per call
    argv = command(8443, Path("/m"), 2, Path("c.pem"), Path("k.pem"))
    assert argv[1:3] == ["-m", "infra.bench_plain"] and argv[-4:] == ["--cert", "c.pem", "--key", "k.pem"]
    assert "--cert" not in command(8443, Path("/m"), 2, None, None)


def test_hop_latency_is_the_mean_of_the_online_hops_over_the_interval() -> None:
    from infra.bench_sync import hop_latency

    before = {"scan": {'detectflow_hop_seconds_sum{lane="online",stage="scan"}': 1.0,
                       'detectflow_hop_seconds_count{lane="online",stage="scan"}': 10.0,
                       'detectflow_hop_seconds_sum{lane="batch",stage="scan"}': 5.0,
                       'detectflow_hop_seconds_count{lane="batch",stage="scan"}': 1.0},
              "recorder": {}}
    after = {"scan": {'detectflow_hop_seconds_sum{lane="online",stage="scan"}': 1.04,
                      'detectflow_hop_seconds_count{lane="online",stage="scan"}': 14.0,
                      'detectflow_hop_seconds_sum{lane="batch",stage="scan"}': 9.0,
                      'detectflow_hop_seconds_count{lane="batch",stage="scan"}': 2.0},
             "recorder": {}}
    out = hop_latency(before, after)
    assert list(out) == ["scan"]  # a stage that polled nothing online has no figure
    assert abs(out["scan"] - 10.0) < 1e-9  # 0.04 s over 4 records


def test_targets_compare_with_the_plain_server_in_the_same_run() -> None:
    from infra.bench_cost import ModelCost
    from infra.bench_sync import Level, Measured, format_targets, summarize

    def level(conc: int, ms: float, n: int, wall: float, cpu: dict[str, float]) -> Level:
        return Level(summarize(conc, [(ms, 200)] * n, wall), {}, cpu, n)

    cpu = {"inference": 40.0, "preprocess": 4.0, "kafka": 10.0, "bench client": 99.0}
    m = Measured(base={}, cost=ModelCost(decode_ms=2.0, model_ms=30.0, images=14),
                 levels=[level(1, 60.0, 10, 1.0, cpu), level(16, 600.0, 40, 1.0, cpu)],
                 plain=[level(1, 30.0, 10, 0.5, {}), level(16, 300.0, 40, 1.0, {})], cache=[], warm_calls=0, rss={},
                 hop_offsets=[])
    out = format_targets(m)
    assert "16 callers / plain server     = 1.00x (target >= 0.90x: met)" in out
    assert "+30.0 ms (target <= +25 ms: MISSED)" in out
    assert "tax at 16 callers             = 22 CPU-ms/img (target <= 40: met)" in out  # 54 - 30 - 2; client not counted
