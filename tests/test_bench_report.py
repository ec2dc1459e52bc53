"""benchmarks/report.py: the target verdicts and ratios, on made-up summaries.

Each target is checked on both sides of its threshold (the goal itself counts as
met), against the reference it names, and with its workloads missing (not
measured, never MET or MISSED).
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import report


def _summary(**workloads: dict[str, float]) -> dict[str, Any]:
    """A summary as summarize() makes it, from one run per workload (median = the value)."""
    return report.summarize({name.replace("_", "-"): [metrics]
                             for name, metrics in workloads.items()})


def _target(summary: dict[str, Any], label: str) -> dict[str, Any]:
    found = [t for t in report.targets(summary) if t["target"].startswith(label)]
    assert len(found) == 1, [t["target"] for t in report.targets(summary)]
    return found[0]


def _verdict_line(summary: dict[str, Any], label: str) -> str:
    lines = [line for line in report.table(summary, {}, []).splitlines()
             if line.strip().startswith(label)]
    assert len(lines) == 1
    return lines[0]


# -- ratios of the targets: the named reference, met at the goal, missed past it ------------


@pytest.mark.parametrize(("records", "met"), [(250.0, True), (249.0, False), (400.0, True)])
def test_records_vs_same_size_string(records: float, met: bool) -> None:
    """Records echo against the string echo of the same run (not a floor): >= 0.5x."""
    summary = _summary(txcallme_records={"calls_per_s": records},
                       txcallme_records_str={"calls_per_s": 500.0},
                       floor_pika_64={"calls_per_s": 10_000.0})
    t = _target(summary, "records echo vs string echo")
    assert t["value"] == pytest.approx(records / 500.0)
    assert t["met"] is met
    assert _verdict_line(summary, "records echo").endswith("MET" if met else "MISSED")


@pytest.mark.parametrize(("calls", "met"), [(8000.0, True), (7990.0, False)])
def test_64_in_flight_vs_best_floor(calls: float, met: bool) -> None:
    """64 in flight against the fastest floor of the same mode: other modes do not count."""
    summary = _summary(txcallme_64={"calls_per_s": calls},
                       floor_pika_64={"calls_per_s": 10_000.0},
                       floor_txamqp_64={"calls_per_s": 6_000.0},
                       floor_pika_64k={"calls_per_s": 50_000.0},
                       floor_pika_256={"calls_per_s": 90_000.0})
    t = _target(summary, "64 in flight: txcallme vs raw floor")
    assert t["value"] == pytest.approx(calls / 10_000.0)
    assert t["met"] is met


@pytest.mark.parametrize(("calls", "met"), [(3000.0, True), (2990.0, False)])
def test_64_in_flight_vs_aiopika(calls: float, met: bool) -> None:
    """At least 3x aio-pika's RPC pattern at 64 in flight."""
    summary = _summary(txcallme_64={"calls_per_s": calls}, aiopika_64={"calls_per_s": 1000.0})
    t = _target(summary, "64 in flight: txcallme vs aio-pika")
    assert t["value"] == pytest.approx(calls / 1000.0)
    assert t["met"] is met


@pytest.mark.parametrize(("p50", "met"), [(1.25, True), (1.26, False), (0.9, True)])
def test_serial_p50_vs_lowest_floor(p50: float, met: bool) -> None:
    """One at a time: p50 against the lowest floor p50 of the serial mode; <= 1.25x."""
    summary = _summary(txcallme_serial={"p50_ms": p50},
                       floor_pika_serial={"p50_ms": 1.0},
                       floor_txamqp_serial={"p50_ms": 2.0})
    t = _target(summary, "one at a time")
    assert t["value"] == pytest.approx(p50)
    assert t["met"] is met


@pytest.mark.parametrize(("calls", "met"), [(700.0, True), (699.0, False)])
def test_64k_vs_floor(calls: float, met: bool) -> None:
    """64 KiB echo against the 64k floor (not the 64-in-flight one); >= 0.7x."""
    summary = _summary(txcallme_64k={"calls_per_s": calls},
                       floor_pika_64k={"calls_per_s": 1000.0},
                       floor_pika_64={"calls_per_s": 100.0})
    t = _target(summary, "64 KiB echo")
    assert t["value"] == pytest.approx(calls / 1000.0)
    assert t["met"] is met


@pytest.mark.parametrize(("cpu", "met"), [(130.0, True), (131.0, False)])
def test_cpu_vs_cheaper_floor(cpu: float, met: bool) -> None:
    """Client+server CPU per call at 64 in flight against the cheaper raw floor; <= 1.3x."""
    summary = _summary(txcallme_64={"cpu_us_per_call": cpu},
                       floor_pika_64={"cpu_us_per_call": 200.0},
                       floor_txamqp_64={"cpu_us_per_call": 100.0})
    t = _target(summary, "64 in flight: client+server CPU")
    assert t["value"] == pytest.approx(cpu / 100.0)
    assert t["met"] is met


@pytest.mark.parametrize(("growth", "met"), [(10.0, True), (-10.0, True), (10.5, False),
                                             (-10.5, False), (0.0, True)])
def test_soak_growth_within_bounds(growth: float, met: bool) -> None:
    """Soak RSS growth: within +-10 %, shrinking as well as growing; not a ratio."""
    summary = _summary(soak={"client_rss_growth_pct": growth, "server_rss_growth_pct": 1.0})
    client = _target(summary, "soak: RSS growth after warm-up, client")
    assert client["value"] == growth and client["met"] is met
    assert _target(summary, "soak: RSS growth after warm-up, server")["met"] is True


@pytest.mark.parametrize(("calls", "met"), [(2560.0, True), (2550.0, False)])
def test_threads_vs_ideal(calls: float, met: bool) -> None:
    """32 threads of a 10 ms handler against the ideal 3,200 calls/s; >= 0.8x."""
    t = _target(_summary(txcallme_threads={"calls_per_s": calls}), "10 ms blocking handler")
    assert t["value"] == pytest.approx(calls / 3200.0)
    assert t["met"] is met


@pytest.mark.parametrize(("per_call", "met"), [(4096.0, True), (4200.0, False)])
def test_memory_per_pending_call(per_call: float, met: bool) -> None:
    """Memory per pending call in KiB; <= 4."""
    t = _target(_summary(memory={"rss_bytes_per_pending_call": per_call}), "memory")
    assert t["value"] == pytest.approx(per_call / 1024)
    assert t["met"] is met


# -- missing workloads ------------------------------------------------------------------------


def test_missing_workloads_are_not_measured() -> None:
    """A target whose workload (or its reference) did not run has no value and no verdict."""
    summary = _summary(txcallme_records={"calls_per_s": 100.0},
                       txcallme_64={"calls_per_s": 5000.0})
    targets = report.targets(summary)
    assert len(targets) == 10
    assert all(t["value"] is None and t["met"] is None for t in targets)
    line = _verdict_line(summary, "records echo")
    assert line.endswith("not measured") and "n/a" in line


def test_zero_reference_is_not_measured() -> None:
    """A reference of zero gives no ratio rather than a division error or a verdict."""
    summary = _summary(txcallme_records={"calls_per_s": 100.0},
                       txcallme_records_str={"calls_per_s": 0.0})
    t = _target(summary, "records echo")
    assert t["value"] is None and t["met"] is None


# -- the table's ratios ---------------------------------------------------------------------


def test_ratios_use_named_reference_over_floor() -> None:
    """A workload with ``vs`` is compared with that workload, one without with its best floor;
    a missing workload or reference gives no row, and growth percentages no ratio."""
    summary = _summary(
        txcallme_records={"calls_per_s": 200.0, "p50_ms": 4.0, "client_rss_growth_pct": 2.0},
        txcallme_records_str={"calls_per_s": 400.0, "p50_ms": 2.0, "client_rss_growth_pct": 1.0},
        txcallme_64={"calls_per_s": 6000.0},
        floor_pika_64={"calls_per_s": 10_000.0},
        floor_txamqp_64={"calls_per_s": 8_000.0})
    workloads = [
        {"name": "txcallme-records", "vs": "txcallme-records-str", "floor_mode": "-64"},
        {"name": "txcallme-64", "floor_mode": "-64"},
        {"name": "txcallme-64k", "floor_mode": "-64k"},  # did not run
        {"name": "txcallme-records-str", "floor_mode": "-64k"},  # no floor of that mode
    ]
    rats = report.ratios(summary, workloads)
    assert set(rats) == {"txcallme-records", "txcallme-64"}
    assert rats["txcallme-records"]["floor"] == "txcallme-records-str"
    assert rats["txcallme-records"]["ratios"] == {"calls_per_s": 0.5, "p50_ms": 2.0}
    assert rats["txcallme-64"] == {"floor": "floor-pika-64", "ratios": {"calls_per_s": 0.6}}
    table = report.table(summary, rats, ["txcallme-records", "txcallme-64", "txcallme-64k"])
    assert "0.50x txcallme-records-str" in table and "0.60x floor-pika-64" in table
    assert "txcallme-64k" in table and "(no result)" in table


def test_summarize_medians() -> None:
    """Medians, min and max over the repetitions; non-numbers are left out."""
    summary = report.summarize({"w": [{"calls_per_s": 3.0}, {"calls_per_s": 1.0},
                                      {"calls_per_s": 10.0}, {"calls_per_s": None}]})
    assert summary == {"w": {"calls_per_s": {"median": 3.0, "min": 1.0, "max": 10.0, "n": 3}}}
