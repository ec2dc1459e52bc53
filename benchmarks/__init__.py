"""The txcallme benchmark kit: ``python -m benchmarks`` (measured, never asserted)."""
