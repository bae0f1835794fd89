"""Fault-suite infrastructure: private RabbitMQ clusters and a cuttable TCP proxy."""
