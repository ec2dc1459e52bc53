"""Summaries of repeated runs: medians with min-max, ratios to the floor
measured in the same run, the target checks, a text table and JSON lines."""

from __future__ import annotations

import statistics
from typing import Any

#: (metric, label, higher is better)
METRICS = [
    ("calls_per_s", "calls/s", True),
    ("p50_ms", "p50 ms", False),
    ("p99_ms", "p99 ms", False),
    ("client_cpu_us_per_call", "client CPU us/call", False),
    ("server_cpu_us_per_call", "server CPU us/call", False),
    ("rss_bytes_per_pending_call", "RSS bytes/pending call", False),
]
IDEAL_THREADS = 3200.0


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> metric -> {median, min, max, n}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, reps in runs.items():
        for metric, _label, _up in METRICS:
            values = [r[metric] for r in reps if isinstance(r.get(metric), (int, float))]
            if values:
                out.setdefault(name, {})[metric] = {
                    "median": statistics.median(values), "min": min(values),
                    "max": max(values), "n": len(values)}
    return out


def floor_of(summary: dict[str, Any], workload: dict[str, Any]) -> str | None:
    """The floor workload to compare *workload* with: the fastest raw echo
    run in the same mode (concurrency and payload)."""
    mode = workload.get("floor_mode")
    if mode is None:
        return None
    candidates = [n for n in summary if n.startswith("floor-") and n.endswith(mode)
                  and "calls_per_s" in summary[n]]
    if not candidates:
        return None
    return max(candidates, key=lambda n: summary[n]["calls_per_s"]["median"])


def ratios(summary: dict[str, Any], workloads: list[dict[str, Any]]) -> dict[str, Any]:
    """workload -> (floor name, metric -> ratio of medians)."""
    out: dict[str, Any] = {}
    for w in workloads:
        name = w["name"]
        floor = floor_of(summary, w)
        if name not in summary or floor is None or floor == name:
            continue
        r = {m: summary[name][m]["median"] / summary[floor][m]["median"]
             for m in summary[name] if m in summary[floor] and summary[floor][m]["median"]}
        out[name] = {"floor": floor, "ratios": r}
    return out


def _med(summary: dict[str, Any], name: str, metric: str) -> float | None:
    return summary.get(name, {}).get(metric, {}).get("median")


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and verdict."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    floor64 = max((v for v in (_med(summary, "floor-pika-64", "calls_per_s"),
                               _med(summary, "floor-txamqp-64", "calls_per_s")) if v),
                  default=None)
    floor_p50 = min((v for v in (_med(summary, "floor-pika-serial", "p50_ms"),
                                 _med(summary, "floor-txamqp-serial", "p50_ms")) if v),
                    default=None)
    tx64 = _med(summary, "txcallme-64", "calls_per_s")
    threads = _med(summary, "txcallme-threads", "calls_per_s")
    mem = _med(summary, "memory", "rss_bytes_per_pending_call")
    rows = [
        ("txcallme-64 calls/s vs aio-pika RPC (64 in flight)", ">=", 2.0,
         ratio(tx64, _med(summary, "aiopika-64", "calls_per_s")), "x"),
        ("txcallme-64 calls/s vs raw floor (64 in flight)", ">=", 0.6, ratio(tx64, floor64), "x"),
        ("txcallme-serial p50 vs raw floor p50", "<=", 1.5,
         ratio(_med(summary, "txcallme-serial", "p50_ms"), floor_p50), "x"),
        ("txcallme-threads calls/s vs ideal 3,200/s", ">=", 0.8,
         ratio(threads, IDEAL_THREADS), "x"),
        ("memory: KiB per pending call", "<=", 4.0, mem / 1024 if mem is not None else None,
         " KiB"),
    ]
    out = []
    for label, op, goal, value, unit in rows:
        ok = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": label, "op": op, "goal": goal, "value": value, "unit": unit,
                    "met": ok})
    return out


def _fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(summary: dict[str, Any], rats: dict[str, Any], order: list[str]) -> str:
    lines = [f"{'workload':<22} {'metric':<24} {'median':>10} {'min-max':>21}  vs floor",
             "-" * 92]
    for name in order:
        if name not in summary:
            lines.append(f"{name:<22} (no result)")
            continue
        floor = rats.get(name, {})
        for metric, label, _up in METRICS:
            s = summary[name].get(metric)
            if s is None:
                continue
            r = floor.get("ratios", {}).get(metric)
            vs = f"{r:.2f}x {floor['floor']}" if r is not None else ""
            span = f"{_fmt(s['min'])}-{_fmt(s['max'])}"
            lines.append(f"{name:<22} {label:<24} {_fmt(s['median']):>10} {span:>21}  {vs}")
    lines.append("")
    lines.append("Targets")
    for t in targets(summary):
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:<52} {value:>11}  (target {t['op']} {t['goal']}"
                     f"{t['unit']})  {verdict}")
    return "\n".join(lines)
