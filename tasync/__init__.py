"""The command line and the node runtime of tasync; nothing imports this package."""
