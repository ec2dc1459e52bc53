"""Summaries of repeated runs: medians with min-max, ratios to the floor (or
to the workload named by ``vs``) measured in the same run, the target
checks, a text table and JSON lines."""

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
    ("cpu_us_per_call", "client+server CPU us/call", False),
    ("rss_bytes_per_pending_call", "RSS bytes/pending call", False),
    ("client_rss_start_mib", "client RSS MiB, start", False),
    ("client_rss_end_mib", "client RSS MiB, end", False),
    ("client_rss_growth_pct", "client RSS growth %", False),
    ("server_rss_start_mib", "server RSS MiB, start", False),
    ("server_rss_end_mib", "server RSS MiB, end", False),
    ("server_rss_growth_pct", "server RSS growth %", False),
]
#: ratios of these mean nothing (a ratio of percentages, or of two RSS)
NO_RATIO = {"client_rss_growth_pct", "server_rss_growth_pct", "client_rss_start_mib",
            "client_rss_end_mib", "server_rss_start_mib", "server_rss_end_mib"}
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
    """workload -> (reference name, metric -> ratio of medians); the reference is
    the workload's ``vs`` if it names one, else its floor."""
    out: dict[str, Any] = {}
    for w in workloads:
        name = w["name"]
        ref = w.get("vs") or floor_of(summary, w)
        if name not in summary or ref is None or ref == name or ref not in summary:
            continue
        r = {m: summary[name][m]["median"] / summary[ref][m]["median"]
             for m in summary[name]
             if m in summary[ref] and summary[ref][m]["median"] and m not in NO_RATIO}
        out[name] = {"floor": ref, "ratios": r}
    return out


def _med(summary: dict[str, Any], name: str, metric: str) -> float | None:
    return summary.get(name, {}).get(metric, {}).get("median")


def _best_floor(summary: dict[str, Any], mode: str, metric: str = "calls_per_s",
                higher: bool = True) -> float | None:
    values = [v for n in summary if n.startswith("floor-") and n.endswith(mode)
              if (v := _med(summary, n, metric))]
    if not values:
        return None
    return max(values) if higher else min(values)


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (and the kit's older ones), each with its measured value
    and verdict. Floors are the best raw echo of the same mode in the same run."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    tx64 = _med(summary, "txcallme-64", "calls_per_s")
    threads = _med(summary, "txcallme-threads", "calls_per_s")
    mem = _med(summary, "memory", "rss_bytes_per_pending_call")
    floor64 = _best_floor(summary, "-64")
    # the cheaper raw floor's client+server CPU per call
    floor64_cpu = min((v for n in ("floor-pika-64", "floor-txamqp-64")
                       if (v := _med(summary, n, "cpu_us_per_call"))), default=None)
    rows = [
        ("64 in flight: txcallme vs raw floor, calls/s", ">=", 0.8, ratio(tx64, floor64), "x"),
        ("64 in flight: txcallme vs aio-pika RPC, calls/s", ">=", 3.0,
         ratio(tx64, _med(summary, "aiopika-64", "calls_per_s")), "x"),
        ("one at a time: txcallme p50 vs raw floor p50", "<=", 1.25,
         ratio(_med(summary, "txcallme-serial", "p50_ms"),
               _best_floor(summary, "-serial", "p50_ms", higher=False)), "x"),
        ("64 KiB echo: txcallme vs raw floor, calls/s", ">=", 0.7,
         ratio(_med(summary, "txcallme-64k", "calls_per_s"), _best_floor(summary, "-64k")),
         "x"),
        ("records echo vs string echo of the same size", ">=", 0.5,
         ratio(_med(summary, "txcallme-records", "calls_per_s"),
               _med(summary, "txcallme-records-str", "calls_per_s")), "x"),
        ("soak: RSS growth after warm-up, client", "|<=|", 10.0,
         _med(summary, "soak", "client_rss_growth_pct"), " %"),
        ("soak: RSS growth after warm-up, server", "|<=|", 10.0,
         _med(summary, "soak", "server_rss_growth_pct"), " %"),
        ("64 in flight: client+server CPU/call vs floor", "<=", 1.3,
         ratio(_med(summary, "txcallme-64", "cpu_us_per_call"), floor64_cpu), "x"),
        ("10 ms blocking handler, 32 threads: vs 3,200/s", ">=", 0.8,
         ratio(threads, IDEAL_THREADS), "x"),
        ("memory: KiB per pending call", "<=", 4.0, mem / 1024 if mem is not None else None,
         " KiB"),
    ]
    out = []
    for label, op, goal, value, unit in rows:
        if value is None:
            ok = None
        elif op == ">=":
            ok = value >= goal
        elif op == "<=":
            ok = value <= goal
        else:  # |<=|: within +-goal
            ok = abs(value) <= goal
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
    lines = [f"{'workload':<22} {'metric':<26} {'median':>10} {'min-max':>21}  "
             "vs floor (or named workload)", "-" * 112]
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
            lines.append(f"{name:<22} {label:<26} {_fmt(s['median']):>10} {span:>21}  {vs}")
    lines.append("")
    lines.append("Targets")
    for t in targets(summary):
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        op = "within +-" if t["op"] == "|<=|" else t["op"] + " "
        lines.append(f"  {t['target']:<50} {value:>11}  (target {op}{t['goal']}"
                     f"{t['unit']})  {verdict}")
    return "\n".join(lines)
