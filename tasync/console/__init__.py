"""tasync's web console: the network, its health and its configuration, in a browser.

``tasync console`` serves it alone; ``tasync.console.app.console_part`` makes it a part of the
web stack (``tasync.web``), so it can be mounted beside the HTTP intake. Pages are rendered on
the server (Jinja2); the vendored htmx in ``static/`` refreshes the network page in place. The
console is a client of the network like the command line: it keeps no state a node does not
(only its sessions, in memory).
"""
