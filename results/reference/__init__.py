"""Published reference rows (CSV), installed as ``ibot_bench.reference``.

A data package: see :mod:`ibot_bench.resources` for how they are found.
"""
