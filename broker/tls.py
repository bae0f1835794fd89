"""TLS to the broker: which files to use, from options or the environment, checked early.

``tasync.broker.connection`` turns ``Settings.tls`` (``TlsFiles``) into py-amqp's TLS options for
``amqps://`` URLs. This module fills it from ``--ca-file/--cert-file/--key-file`` or
``$TASYNC_SSL_CA_FILE``, ``$TASYNC_SSL_CERT_FILE``, ``$TASYNC_SSL_KEY_FILE`` (options win, the
variables are read in ``tasync.broker.settings``), so every process of a network can be pointed at
its certificates once, in its environment.

Files are checked when settings are built, so a typo gives a one-line usage error naming the
option instead of an ``ssl`` error at the first connection. Giving TLS files with only
``amqp://`` URLs is refused too: the operator clearly meant to encrypt, and silently sending
passwords in clear text would be the worst reading of that.

What the broker side looks like (``rabbitmq.conf``; ``tests/harness/tls_broker.py`` builds the
same with a throw-away CA)::

    listeners.ssl.default = 5671
    ssl_options.cacertfile = /etc/rabbitmq/tls/ca.pem
    ssl_options.certfile   = /etc/rabbitmq/tls/server.pem   # names every host clients use
    ssl_options.keyfile    = /etc/rabbitmq/tls/server.key
    ssl_options.verify     = verify_peer
    ssl_options.fail_if_no_peer_cert = true                 # client certificates required

and on each tasync host::

    export TASYNC_BROKER_URL='amqps://node-a:PASSWORD@mq1.example.net:5671/tasync'
    export TASYNC_SSL_CA_FILE=/etc/tasync/tls/ca.pem
    export TASYNC_SSL_CERT_FILE=/etc/tasync/tls/node-a.pem
    export TASYNC_SSL_KEY_FILE=/etc/tasync/tls/node-a.key

The broker's certificate is checked against the CA and against the host name of the URL (a URL
naming ``localhost`` is checked as ``127.0.0.1``, because kombu rewrites it). With several
``amqps://`` URLs, kombu keeps the host name of the first URL it tried for the next one within
one connection attempt, so a cluster's certificates should name every broker host (one
certificate with all names as subjectAltName is the usual way).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from tasync.broker.errors import ConfigError
from tasync.broker.settings import (
    ENV_SSL_CA_FILE,
    ENV_SSL_CERT_FILE,
    ENV_SSL_KEY_FILE,
    TlsFiles,
)

#: ``TlsFiles`` field -> (environment variable, option shown in messages).
TLS_OPTIONS: dict[str, tuple[str, str]] = {
    "ca_file": (ENV_SSL_CA_FILE, "--ca-file"),
    "cert_file": (ENV_SSL_CERT_FILE, "--cert-file"),
    "key_file": (ENV_SSL_KEY_FILE, "--key-file"),
}


def tls_files(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
              key_file: str | Path | None = None, *,
              environ: TlsFiles | None = None) -> TlsFiles:
    """The TLS files to use: the given ones, else the environment's, each checked.

    Args:
        ca_file: CA bundle that signed the broker's certificate (default: the system's CAs).
        cert_file: client certificate (PEM), for brokers with ``fail_if_no_peer_cert``.
        key_file: the client certificate's private key (may be omitted when ``cert_file``
            holds both).
        environ: what the environment says (``TlsFiles.from_env()`` by default; tests pass
            their own).

    Raises:
        ConfigError: a file is missing or unreadable, or a key is given without a certificate.
    """
    env = TlsFiles.from_env() if environ is None else environ
    given = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    chosen: dict[str, str] = {}
    for item in fields(TlsFiles):
        variable, option = TLS_OPTIONS[item.name]
        value = str(given[item.name] or getattr(env, item.name) or "").strip()
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"{option} / ${variable}: {path} is not a readable file")
        chosen[item.name] = str(path)
    if "key_file" in chosen and "cert_file" not in chosen:
        raise ConfigError("--key-file needs --cert-file (the client certificate it belongs to)")
    return TlsFiles(**chosen)


def check_tls_urls(broker_urls: tuple[str, ...], tls: TlsFiles) -> None:
    """Refuse TLS files next to URLs that would not use them (none is ``amqps://``).

    Raises:
        ConfigError: TLS files are set but every broker URL is plain ``amqp://``.
    """
    if not tls.given:
        return
    if not any(url.startswith("amqps://") for url in broker_urls):
        raise ConfigError("TLS files are set (--ca-file/--cert-file/--key-file or "
                          "$TASYNC_SSL_*) but no broker URL is amqps://: use amqps://HOST:5671/")
