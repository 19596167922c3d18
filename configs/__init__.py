"""Shipped YAML configs (suites/, tasks/, pretrain/), installed as ``ibot_bench.configs``.

A data package: see :mod:`ibot_bench.resources` for how they are found.
"""
