"""Benchmarks of tasync against a real RabbitMQ: ``python -m benchmarks [--quick]`` runs them all.

Each one (``python -m benchmarks.<name>``) creates its own virtual hosts, starts real
``tasync-worker`` processes through ``benchmarks.common``, compares them with the raw client
(``benchmarks.raw``) in the same run, writes JSON to ``benchmarks/results/`` and its figure to
``docs/img/``; ``docs/benchmarks.md`` reports the results.
"""
