"""What publishes into the network: the master's change relay, alert sending, the HTTP intake.

Builds on ``broker`` only; the CLI and the node runtime in ``tasync`` call into it.
"""
