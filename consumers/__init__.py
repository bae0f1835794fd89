"""What a node consumes: configuration changes (sync), alerts (delivery), recovery, totals.

Builds on ``broker`` only; the node runtime in ``tasync`` wires these pieces together.
"""
