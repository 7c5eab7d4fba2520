"""Helpers for the tests: a throwaway PKI, a real mosquitto, a byte-counting relay.

The logic lives here rather than in ``conftest.py`` so that fixtures stay thin
and the same helpers serve ``make demo`` and the benchmarks.
"""
