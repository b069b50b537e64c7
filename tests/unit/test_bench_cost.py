"""The pure parts of the benches' cost accounting: CPU per image, the tax and its attribution, bytes per hop,
the GPU projection, and their formatting."""

from __future__ import annotations

import math
import os

import pytest

from infra.bench_cost import (
    GPU_MODEL_MS_PER_IMG,
    GPU_MODEL_SOURCE,
    USD_PER_CORE_HOUR,
    ModelCost,
    attribute,
    cpu_ms_per_image,
    cpu_snapshot,
    format_cpu,
    format_hops,
    format_projection,
    format_tax,
    per_image,
    project,
    tax_of,
)

COST = ModelCost(decode_ms=5.0, model_ms=139.0, images=28)


def test_cpu_per_image_from_two_snapshots() -> None:
    before = {"inference": 10.0, "kafka": 100.0, "gone": 3.0}
    after = {"inference": 12.0, "kafka": 100.5}  # a process that exited reads 0 (infra.procstats.cpu_seconds)
    cpu = cpu_ms_per_image(before, after, images=10)
    assert cpu["inference"] == pytest.approx(200.0) and cpu["kafka"] == pytest.approx(50.0)
    assert cpu["gone"] == pytest.approx(-300.0)
    assert all(math.isnan(v) for v in cpu_ms_per_image(before, after, images=0).values())


def test_cpu_snapshot_reads_this_process() -> None:
    snap = cpu_snapshot({"me": os.getpid()})
    assert snap["me"] > 0


def test_tax_takes_the_model_off_inference_and_the_decode_off_preprocess() -> None:
    cpu = {"inference": 150.0, "preprocess": 20.0, "kafka": 42.0, "cassandra": 39.0, "clamd": 31.0, "gateway": 44.0}
    tax = tax_of(cpu, COST)
    assert tax.total_ms == pytest.approx(326.0)
    assert tax.tax_ms == pytest.approx(326.0 - 139.0 - 5.0)
    assert tax.shares["inference"] == pytest.approx(11.0) and tax.shares["preprocess"] == pytest.approx(15.0)
    assert tax.shares["kafka"] == 42.0
    assert sum(tax.shares.values()) == pytest.approx(tax.tax_ms)  # the breakdown adds up to the tax
    assert cpu["inference"] == 150.0  # the input is not changed


def test_tax_of_a_one_process_server_charges_it_both() -> None:
    tax = tax_of({"plain server": 150.0}, COST, model_in="plain server", decode_in="plain server")
    assert tax.tax_ms == pytest.approx(6.0) and tax.shares == {"plain server": pytest.approx(6.0)}


def test_tax_needs_the_processes_it_charges() -> None:
    with pytest.raises(ValueError, match="inference"):
        tax_of({"preprocess": 20.0, "kafka": 1.0}, COST)


def test_formatting_sorts_largest_first() -> None:
    assert format_cpu({"a": 1.0, "b": 30.25, "c": 2.0}) == "b 30.2, c 2.0, a 1.0"
    cpu = {"inference": 150.0, "preprocess": 20.0, "kafka": 42.0, "cassandra": 39.0, "clamd": 31.0, "gateway": 44.0}
    assert format_tax(tax_of(cpu, COST)) == (
        "tax 182 CPU-ms/img = total 326 - model 139 - decode 5: "
        "gateway 44, kafka 42, cassandra 39, clamd 31, preprocess 15, inference 11")


def test_gpu_projection() -> None:
    p = project(182.0, gpu_ms=0.5, usd_per_core_hour=0.05)
    assert p.cores_per_gpu == pytest.approx(364.0)
    assert p.usd_per_gpu_hour == pytest.approx(18.2)
    assert p.usd_per_million == pytest.approx(182.0 * 1e6 / 3.6e6 * 0.05)  # core-hours per million images x price
    with pytest.raises(ValueError):
        project(1.0, gpu_ms=0.0)
    line = format_projection(182.0)
    assert GPU_MODEL_SOURCE in line and "H200" in line  # a measured device figure, labelled as such
    assert "2022 cores" in line  # 182 / 0.09: the model tuned for the GPU
    assert f"{182.0 / GPU_MODEL_MS_PER_IMG:.0f} CPU cores" in line and f"${USD_PER_CORE_HOUR}/core-hour" in line


def test_records_are_attributed_to_the_interval_holding_their_offset() -> None:
    tp = ("p.detect.online.submitted", 0)
    intervals = [({tp: 10}, {tp: 20}), ({tp: 20}, {tp: 35})]
    assert attribute(9, intervals, tp) is None
    assert attribute(10, intervals, tp) == 0 and attribute(19, intervals, tp) == 0
    assert attribute(20, intervals, tp) == 1 and attribute(34, intervals, tp) == 1
    assert attribute(35, intervals, tp) is None
    assert attribute(12, intervals, ("other", 0)) is None  # a partition no interval saw


def test_bytes_per_image_per_topic() -> None:
    tally = {"p.detect.online.submitted": (10, 10 * 2048), "p.detect.online.inferred": (10, 10 * 1024),
             "p.detect.online.submitted.dlq": (0, 0)}
    hops = per_image(tally, 10, "p.")
    assert hops == {"detect.online.inferred": (1.0, 1024.0), "detect.online.submitted": (1.0, 2048.0)}
    assert per_image(tally, 0, "p.") == {}
    assert format_hops(hops) == ("detect.online.inferred 1.00 rec 1 KiB, detect.online.submitted 1.00 rec 2 KiB"
                                 "  (total 3 KiB/img written)")
