"""``python -m benchmarks``: run every workload as separate server and client
processes, repeat, and report medians with min-max (table and JSON lines).

    python -m benchmarks [--quick] [--only NAME ...] [--reps N] [--json PATH]
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
from pathlib import Path
from typing import Any

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent

# name, server kind, client kind, client options, floor mode (suffix of the floor to compare)
WORKLOADS: list[dict[str, Any]] = [
    dict(name="floor-pika-serial", server="floor-pika", client="floor-pika", opts=[]),
    dict(name="floor-pika-64", server="floor-pika", client="floor-pika",
         opts=["--concurrency", "64"]),
    dict(name="floor-pika-256", server="floor-pika", client="floor-pika",
         opts=["--concurrency", "256"]),
    dict(name="floor-pika-64k", server="floor-pika", client="floor-pika",
         opts=["--payload", "65536"]),
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
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, short runs (smoke test)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this workload (repeatable; a prefix such as 'floor' works)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--duration", type=float, help="seconds measured per run (default 2.5)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "last-run.jsonl"),
                   metavar="PATH", help="where to write JSON lines")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p.parse_args(argv)


def selected(only: list[str] | None) -> list[dict[str, Any]]:
    if not only:
        return WORKLOADS
    chosen = [w for w in WORKLOADS if any(w["name"] == o for o in only)]
    chosen = chosen or [w for w in WORKLOADS if any(w["name"].startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"no workload matches {only}; see --list")
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


def run_once(w: dict[str, Any], duration: float, warmup: float, log: Any) -> dict[str, Any]:
    """One repetition: server up, client run, server down; merged results."""
    sid = f"bench-{w['name']}-{uuid.uuid4().hex[:8]}"
    py = [sys.executable, "-m"]
    server = subprocess.Popen(py + ["benchmarks.servers", w["server"], sid], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        if not _wait_ready(server, 30):
            return {"error": f"server {w['server']} did not get ready"}
        cmd = py + ["benchmarks.clients", w["client"], sid, "--duration", str(duration),
                    "--warmup", str(warmup)] + w["opts"]
        client = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=120)
        log.write(client.stderr)
        result = _last_json(client.stdout)
        if client.returncode or not result:
            result["error"] = f"client exited {client.returncode}"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    stats = _last_json(out)
    result["server_calls"] = stats.get("calls")
    if w["client"] != "memory":  # held calls: the server's CPU per call means nothing
        result["server_cpu_us_per_call"] = stats.get("server_cpu_us_per_call")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        print("\n".join(w["name"] for w in WORKLOADS))
        return 0
    workloads = selected(args.only)
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (0.8 if args.quick else 2.5)
    warmup = 0.2 if args.quick else 0.5
    runs: dict[str, list[dict[str, Any]]] = {w["name"]: [] for w in workloads}
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w+", prefix="bench-", suffix=".log", delete=False) as log:
        for rep in range(reps):  # interleaved, so slow drifts hit every workload alike
            for w in workloads:
                t = time.monotonic()
                result = run_once(w, duration, warmup, log)
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
    print(f"\n{reps} repetition(s), {time.monotonic() - started:.0f} s; process logs: {log.name}")
    for name, metrics in summary.items():
        records.append({"kind": "summary", "workload": name, "metrics": metrics,
                        "vs_floor": rats.get(name)})
    records.extend({"kind": "target", **t} for t in report.targets(summary))
    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"JSON lines: {args.json}")
    return 1 if any("error" in r for r in records if r["kind"] == "run") else 0


def _brief(r: dict[str, Any]) -> str:
    if "rss_bytes_per_pending_call" in r:
        return f"{r['rss_bytes_per_pending_call']:.0f} B/pending call"
    return f"{r.get('calls_per_s') or 0:,.0f} calls/s, p50 {r.get('p50_ms') or 0:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
