"""Functions ``twistd callme --module benchmarks.handlers`` serves in the
processes workload: a CPU-bound handler, so that throughput shows what
``--processes 2`` adds over one process bound to one core."""

from __future__ import annotations

__all__ = ["burn"]

#: about 1-2 ms of CPU on the development machine
WORK = 20_000


def burn(n: int = WORK) -> int:
    """Pure-Python arithmetic: CPU only, holding the GIL."""
    return sum(i * i for i in range(n))
