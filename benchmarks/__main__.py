"""``python -m benchmarks``: run every workload as separate server and client
processes, repeat, and report medians with min-max, ratios and the targets
(table and JSON lines).

    python -m benchmarks [--quick] [--only NAME ...] [--skip NAME ...] [--reps N]
                         [--duration S] [--soak S] [--soak-warmup S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common, report

ROOT = Path(__file__).resolve().parent.parent
RECORDS_SIZE = common.records_size()
LARGE_RESULT = 1_000_000

# A workload: name, server kind (+ server_opts), client kind (+ opts); floor_mode: the
# suffix of the floor workloads it is compared with; vs: a workload of the same run
# to compare with instead; once: run in the first repetition only (the soak); needs:
# a feature of txcallme the workload measures (skipped, and said so, when absent).
WORKLOADS: list[dict[str, Any]] = [
    dict(name="floor-pika-serial", server="floor-pika", client="floor-pika", opts=[]),
    dict(name="floor-pika-64", server="floor-pika", client="floor-pika",
         opts=["--concurrency", "64"]),
    dict(name="floor-pika-256", server="floor-pika", client="floor-pika",
         opts=["--concurrency", "256"]),
    dict(name="floor-pika-64k", server="floor-pika", client="floor-pika",
         opts=["--payload", "65536"]),
    dict(name="floor-pika-1m", server="floor-pika", client="floor-pika", opts=[],
         server_opts=["--reply-bytes", str(LARGE_RESULT)]),
    dict(name="floor-txamqp-serial", server="floor-txamqp", client="floor-txamqp", opts=[]),
    dict(name="floor-txamqp-64", server="floor-txamqp", client="floor-txamqp",
         opts=["--concurrency", "64"]),
    dict(name="txcallme-serial", server="txcallme", client="txcallme", opts=[],
         floor_mode="-serial"),
    dict(name="txcallme-64", server="txcallme", client="txcallme",
         opts=["--concurrency", "64"], floor_mode="-64"),
    dict(name="txcallme-256", server="txcallme", client="txcallme",
         opts=["--concurrency", "256"], floor_mode="-256"),
    dict(name="txcallme-64k", server="txcallme", client="txcallme-echo",
         opts=["--payload", "65536"], floor_mode="-64k"),
    dict(name="txcallme-records", server="txcallme", client="txcallme-echo",
         opts=["--value", "records"], vs="txcallme-records-str"),
    dict(name="txcallme-records-str", server="txcallme", client="txcallme-echo",
         opts=["--value", "records-size-string"]),
    dict(name="txcallme-1m-result", server="txcallme", client="txcallme-blob",
         opts=["--reply-bytes", str(LARGE_RESULT)], floor_mode="-1m"),
    dict(name="txcallme-threads", server="txcallme-threads", client="txcallme-threads",
         opts=["--concurrency", "64"], floor_mode="-64"),
    dict(name="aiopika-serial", server="aiopika", client="aiopika", opts=[],
         floor_mode="-serial"),
    dict(name="aiopika-64", server="aiopika", client="aiopika",
         opts=["--concurrency", "64"], floor_mode="-64"),
    dict(name="pika-blocking-serial", server="pika-tutorial", client="pika-blocking", opts=[],
         floor_mode="-serial"),
    dict(name="pika-twisted-64", server="pika-tutorial", client="pika-twisted",
         opts=["--concurrency", "64"], floor_mode="-64"),
    dict(name="memory", server="txcallme-hold", client="memory", opts=[]),
    # other features' costs, each against its own baseline in the same run
    dict(name="txcallme-serial-direct", server="txcallme", client="txcallme",
         opts=["--direct-reply-to"], vs="txcallme-serial", needs="direct-reply-to"),
    dict(name="txcallme-64-direct", server="txcallme", client="txcallme",
         opts=["--concurrency", "64", "--direct-reply-to"], vs="txcallme-64",
         needs="direct-reply-to"),
    dict(name="txcallme-64-observed", server="txcallme", client="txcallme",
         opts=["--concurrency", "64", "--observe"], server_opts=["--observe"],
         vs="txcallme-64", needs="observe"),
    dict(name="txcallme-64-prometheus", server="txcallme", client="txcallme",
         opts=["--concurrency", "64", "--observe", "prometheus"],
         server_opts=["--observe", "prometheus"], vs="txcallme-64", needs="observe"),
    dict(name="txcallme-64-sampled", server="txcallme", client="txcallme",
         opts=["--concurrency", "64", "--observe", "sampled"],
         server_opts=["--observe", "sampled"], vs="txcallme-64", needs="observe"),
    dict(name="processes-1", server="twistd", client="twistd", opts=["--concurrency", "16"],
         server_opts=["--processes", "1"], needs="processes"),
    dict(name="processes-2", server="twistd", client="twistd", opts=["--concurrency", "16"],
         server_opts=["--processes", "2"], vs="processes-1", needs="processes"),
    dict(name="soak", server="txcallme", client="soak", opts=["--concurrency", "64"],
         once=True),
]


def _has_observe_hooks() -> bool:
    """The Proxy and the server service call txcallme.observe (not only the module)."""
    import inspect

    from txcallme import proxy, service

    return (".client_call(" in inspect.getsource(proxy)
            and ".server_call(" in inspect.getsource(service))


def _has_processes() -> bool:
    """``twistd callme --processes``."""
    from txcallme import tap

    return any(option[0] == "processes" for option in tap.Options.optParameters)


def _has_direct_reply_to() -> bool:
    """``Proxy(direct_reply_to=True)``, and a server that replies to it (through the
    default exchange, as RabbitMQ requires for ``amq.rabbitmq.reply-to``)."""
    import inspect

    from txcallme import Proxy, service

    return ("direct_reply_to" in inspect.signature(Proxy).parameters
            and "amq.rabbitmq" in inspect.getsource(service))


#: feature name -> is it in this tree?
FEATURES: dict[str, Callable[[], bool]] = {
    "direct-reply-to": _has_direct_reply_to,
    "observe": _has_observe_hooks,
    "processes": _has_processes,
}


def missing_feature(w: dict[str, Any]) -> str | None:
    need = w.get("needs")
    if need is None:
        return None
    try:
        return None if FEATURES[need]() else str(need)
    except Exception:
        return str(need)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, short runs, a 10 s soak (checks that the kit works)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this workload (repeatable; a prefix such as 'floor' works)")
    p.add_argument("--skip", action="append", metavar="NAME",
                   help="leave this workload out (repeatable; prefixes work)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--duration", type=float, help="seconds measured per run (default 2.5)")
    p.add_argument("--soak", type=float, metavar="S",
                   help="seconds the soak measures after its warm-up (default 180, 10 quick)")
    p.add_argument("--soak-warmup", type=float, metavar="S",
                   help="soak warm-up before the first RSS reading (default 30, 3 quick)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "last-run.jsonl"),
                   metavar="PATH", help="where to write JSON lines")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p.parse_args(argv)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p) for p in patterns)


def selected(only: list[str] | None, skip: list[str] | None = None) -> list[dict[str, Any]]:
    chosen = WORKLOADS
    if only:
        exact = [w for w in WORKLOADS if w["name"] in only]
        chosen = exact or [w for w in WORKLOADS if _matches(w["name"], only)]
        if not chosen:
            raise SystemExit(f"no workload matches {only}; see --list")
    if skip:
        chosen = [w for w in chosen if not _matches(w["name"], skip)]
    return chosen


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return env


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> bool:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            line = proc.stdout.readline()
            if line.strip() == "READY":
                return True
            if not line and proc.poll() is not None:
                return False
    return False


def run_once(w: dict[str, Any], duration: float, warmup: float, log: Any,
             quick: bool = False) -> dict[str, Any]:
    """One repetition: server up, client run, server down; merged results."""
    sid = f"bench-{w['name']}-{uuid.uuid4().hex[:8]}"
    py = [sys.executable, "-m"]
    server = subprocess.Popen(py + ["benchmarks.servers", w["server"], sid]
                              + w.get("server_opts", []), cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        if not _wait_ready(server, 90):
            return {"error": f"server {w['server']} did not get ready"}
        cmd = py + ["benchmarks.clients", w["client"], sid, "--duration", str(duration),
                    "--warmup", str(warmup)] + w["opts"]
        if w.get("once"):  # a long run: no cap on calls
            cmd += ["--max-calls", str(10**12)]
        elif quick and w["client"].startswith(("txcallme", "twistd")):
            cmd += ["--timeout", "15"]  # a broken tree fails fast
        try:
            client = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                    timeout=duration + warmup + 120)
        except subprocess.TimeoutExpired as e:
            log.write(str(e.stderr or ""))
            return {"error": "client timed out"}
        log.write(client.stderr)
        result = _last_json(client.stdout)
        if client.returncode or not result:
            result["error"] = f"client exited {client.returncode}"
        elif result.get("errors") and not result.get("calls"):
            result["error"] = f"every call failed ({result['errors']}; see {log.name})"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    stats = _last_json(out)
    result["server_calls"] = stats.get("calls")
    if w["client"] != "memory":  # held calls: the server's CPU per call means nothing
        result["server_cpu_us_per_call"] = stats.get("server_cpu_us_per_call")
    client_cpu, server_cpu = (result.get("client_cpu_us_per_call"),
                              result.get("server_cpu_us_per_call"))
    if client_cpu is not None and server_cpu is not None:
        result["cpu_us_per_call"] = client_cpu + server_cpu
    samples = stats.get("rss_samples")
    if w.get("once") and samples and result.get("measured_from"):
        result["server_rss_start"] = common.rss_at(samples, result["measured_from"])
        result["server_rss_end"] = common.rss_at(samples, result["measured_until"])
    for side in ("client", "server"):
        start, end = result.get(f"{side}_rss_start"), result.get(f"{side}_rss_end")
        if start and end:
            result[f"{side}_rss_start_mib"] = start / 2**20
            result[f"{side}_rss_end_mib"] = end / 2**20
            result[f"{side}_rss_growth_pct"] = (end - start) / start * 100
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        for w in WORKLOADS:
            missing = missing_feature(w)
            print(w["name"] + (f"  (skipped: needs {missing}, not in this tree)"
                               if missing else ""))
        return 0
    workloads = selected(args.only, args.skip)
    skipped = [(w["name"], m) for w in workloads if (m := missing_feature(w))]
    workloads = [w for w in workloads if not missing_feature(w)]
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (0.8 if args.quick else 2.5)
    warmup = 0.2 if args.quick else 0.5
    soak = args.soak or (10.0 if args.quick else 180.0)
    soak_warmup = args.soak_warmup or (3.0 if args.quick else 30.0)
    runs: dict[str, list[dict[str, Any]]] = {w["name"]: [] for w in workloads}
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w+", prefix="bench-", suffix=".log", delete=False) as log:
        for rep in range(reps):  # interleaved, so slow drifts hit every workload alike
            for w in workloads:
                if w.get("once") and rep:
                    continue
                t = time.monotonic()
                long_run = (soak, soak_warmup) if w.get("once") else (duration, warmup)
                result = run_once(w, *long_run, log, quick=args.quick)
                result.update(kind="run", workload=w["name"], rep=rep)
                records.append(result)
                status = result.get("error") or _brief(result)
                print(f"[{rep + 1}/{reps}] {w['name']:<22} {time.monotonic() - t:5.1f}s  "
                      f"{status}", file=sys.stderr, flush=True)
                if "error" not in result:
                    runs[w["name"]].append(result)
    summary = report.summarize(runs)
    rats = report.ratios(summary, workloads)
    print(report.table(summary, rats, [w["name"] for w in workloads]))
    for name, missing in skipped:
        print(f"  {name}: skipped, needs {missing} (not in this tree)")
    print(f"\n{reps} repetition(s), {time.monotonic() - started:.0f} s; process logs: {log.name}")
    for name, metrics in summary.items():
        records.append({"kind": "summary", "workload": name, "metrics": metrics,
                        "vs": rats.get(name)})
    records.extend({"kind": "target", **t} for t in report.targets(summary))
    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"JSON lines: {args.json}")
    return 1 if any("error" in r for r in records if r["kind"] == "run") else 0


def _brief(r: dict[str, Any]) -> str:
    if "rss_bytes_per_pending_call" in r:
        return f"{r['rss_bytes_per_pending_call']:.0f} B/pending call"
    text = f"{r.get('calls_per_s') or 0:,.0f} calls/s, p50 {r.get('p50_ms') or 0:.2f} ms"
    if r.get("errors"):
        text += f", {r['errors']} failed calls"
    for side in ("client", "server"):
        if f"{side}_rss_growth_pct" in r:
            text += (f", {side} RSS {r[f'{side}_rss_start_mib']:.1f} -> "
                     f"{r[f'{side}_rss_end_mib']:.1f} MiB")
    return text


if __name__ == "__main__":
    sys.exit(main())
