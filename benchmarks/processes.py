"""The processes workload's server: ``twistd -n callme --processes N`` serving
:mod:`benchmarks.handlers`, run as a child of this process.

READY once the server queue has N consumers; on SIGTERM, twistd is stopped
(it stops its workers) and one JSON line reports the children's CPU time
(start-up included: its CPU per call is not reported).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent


def _consumers(queue: str) -> int:
    import pika

    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            common.HOST, common.PORT,
            credentials=pika.PlainCredentials(common.USER, common.PASSWORD)))
    except Exception:
        return 0
    try:
        return int(conn.channel().queue_declare(queue=queue, passive=True)
                   .method.consumer_count)
    except Exception:
        return 0
    finally:
        try:
            conn.close()
        except Exception:
            pass


def twistd_server(server_id: str, processes: int) -> None:
    twistd = Path(sys.executable).with_name("twistd")
    cmd = [str(twistd), "-n", "--pidfile=", "callme", "--server-id", server_id,
           "--module", "benchmarks.handlers", "--amqp-host", common.HOST,
           "--amqp-port", str(common.PORT), "--amqp-user", common.USER,
           "--amqp-password", common.PASSWORD, "--processes", str(processes)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    deadline = time.monotonic() + 60
    while _consumers(f"server_{server_id}_queue") < processes:
        if stopping or child.poll() is not None or time.monotonic() > deadline:
            sys.stderr.write(f"twistd callme --processes {processes} did not get ready\n")
            child.kill()
            child.wait()
            return
        time.sleep(0.3)
    common.ready()
    while not stopping and child.poll() is None:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    common.emit({"side": "server", "calls": None, "processes": processes,
                 "cpu_s": usage.ru_utime + usage.ru_stime})
