"""Benchmarks of tasync against a real RabbitMQ: run with ``python -m benchmarks.<name>``.

Each benchmark creates its own virtual host, starts real ``tasync-worker`` processes through
``benchmarks.common``, writes JSON to ``benchmarks/results/`` and plots to ``docs/img/``.
"""
