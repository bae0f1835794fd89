"""The RabbitMQ layer and the shared contract of tasync.

Everything the producers, consumers and the CLI agree on lives here: settings, the error tree,
topology names, wire and configuration schemas, the connection with reconnect, confirmed
publishing, the consumer base and the local SQLite store. Nothing in this package imports from
``producers``, ``consumers`` or ``tasync``.
"""
