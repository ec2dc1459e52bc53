"""``make demo``: serve ``app.add`` with ``twistd callme`` and call it.

Starts ``twistd -n callme --server-id demo-<random> --module app`` in this
directory, waits until it serves, prints ``add(1, 1) = 2``, then stops twistd
with SIGTERM. Exits non-zero with a message (and twistd's log) on failure.
``CALLME_AMQP_URL`` names the broker; twistd reads it too.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from txcallme import Proxy, RpcTimeout, ServerUnavailable

HERE = Path(__file__).resolve().parent
TWISTD = Path(sys.executable).with_name("twistd")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class DemoFailed(Exception):
    pass


async def wait_until_serving(reactor, proxy, process, server_id):
    """Call ``add`` until twistd answers; fail if it dies or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise DemoFailed(f"twistd exited with status {process.returncode} before serving")
        try:
            return await proxy.invoke(server_id, "add", (1, 1), timeout=2)
        except (ServerUnavailable, RpcTimeout):
            if time.monotonic() > deadline:
                raise DemoFailed(f"twistd did not serve {server_id!r} "
                                 f"within {START_TIMEOUT:.0f} s") from None
            await task.deferLater(reactor, 0.2, lambda: None)


async def wait_for_exit(reactor, process, timeout):
    """Fires with the exit status, or None after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.1, lambda: None)
    return process.poll()


async def main(reactor):
    server_id = f"demo-{uuid.uuid4().hex[:8]}"
    command = [str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", server_id,
               "--module", "app"]
    log = tempfile.TemporaryFile(mode="w+")
    proxy = Proxy(amqp_url=os.environ.get("CALLME_AMQP_URL"), timeout=10)
    print("starting:", " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    try:
        result = await wait_until_serving(reactor, proxy, process, server_id)
        print(f"add(1, 1) = {result}", flush=True)
        if result != 2:
            raise DemoFailed(f"expected 2, got {result!r}")
        process.send_signal(signal.SIGTERM)
        status = await wait_for_exit(reactor, process, STOP_TIMEOUT)
        if status is None:
            raise DemoFailed(f"twistd did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM")
        # twistd re-raises SIGTERM after a clean shutdown.
        if status not in (0, -signal.SIGTERM):
            raise DemoFailed(f"twistd exited with status {status}")
        print("twistd stopped")
    except Exception as e:
        log.seek(0)
        print(f"demo failed: {e}\n--- twistd log ---\n{log.read()}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        await proxy.close()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
