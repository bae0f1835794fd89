"""A throw-away test PKI (openssl) and a private RabbitMQ node that requires client certificates.

The node runs beside the system broker through ``tests.harness.rabbit_cluster`` (its own node
name, ports, directories and Erlang cookie), with an extra TLS listener configured as an
operator would::

    listeners.ssl.default = 127.0.0.1:PORT
    ssl_options.cacertfile = ca.pem
    ssl_options.certfile = server.pem
    ssl_options.keyfile = server.key
    ssl_options.verify = verify_peer
    ssl_options.fail_if_no_peer_cert = true

The certificates are made fresh for every run with ``openssl``: a CA, a server certificate for
``localhost`` and ``127.0.0.1``, a client certificate, and a second, unrelated CA for the
"untrusted" cases. EC keys, because they are generated in milliseconds.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from tests.harness.rabbit_cluster import (
    RABBITMQ_USER,
    RabbitCluster,
    RabbitClusterError,
    free_ports,
    unavailable_reason,
)

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    """Paths of the test certificates (all PEM)."""

    root: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {out.stderr.strip()[-500:]}")


def _ca(root: Path, name: str) -> None:
    _openssl("req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=tasync test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)


def _leaf(root: Path, name: str, ca: str, cn: str, extensions: str) -> None:
    (root / f"{name}.ext").write_text(extensions)
    _openssl("req", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=root)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=root)


def make_pki(root: Path) -> Pki:
    """Generate the CA, server and client certificates under ``root``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed")
    _ca(root, "ca")
    _ca(root, "other-ca")
    _leaf(root, "server", "ca", "localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(root, "client", "ca", "tasync-client", "extendedKeyUsage=clientAuth\n")
    _leaf(root, "other-client", "other-ca", "intruder", "extendedKeyUsage=clientAuth\n")
    return Pki(root=root, ca=root / "ca.pem", server_cert=root / "server.pem",
               server_key=root / "server.key", client_cert=root / "client.pem",
               client_key=root / "client.key", other_ca=root / "other-ca.pem",
               other_client_cert=root / "other-client.pem",
               other_client_key=root / "other-client.key")


def _give_to_rabbitmq(pki: Pki) -> None:
    """The node runs as the rabbitmq user: let it read the CA and its own certificate and key."""
    pki.root.chmod(0o755)
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(RABBITMQ_USER)
    for path in (pki.ca, pki.server_cert, pki.server_key):
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o600 if path == pki.server_key else 0o644)


class TlsBroker:
    """One private RabbitMQ node with a TLS listener that demands client certificates.

    Usage::

        with TlsBroker() as broker:
            url = broker.tls_url("/")
    """

    def __init__(self) -> None:
        self.pki: Pki | None = None
        self.cluster: RabbitCluster | None = None
        self.tls_port = 0
        self._root: Path | None = None

    def __enter__(self) -> TlsBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> TlsBroker:
        """Make the PKI and start the node; retries once if the chosen port was taken."""
        reason = unavailable_reason()
        if reason is not None:
            raise RabbitClusterError(reason)
        self._root = Path(tempfile.mkdtemp(prefix="tasync-tls-", dir="/tmp"))
        try:
            self.pki = make_pki(self._root)
            _give_to_rabbitmq(self.pki)
            for attempt in range(2):
                self.tls_port = free_ports(1)[0]
                try:
                    self.cluster = RabbitCluster(1, extra_config=self._config()).start()
                    break
                except RabbitClusterError:
                    if attempt:
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self) -> dict[str, str]:
        assert self.pki is not None
        return {
            "listeners.ssl.default": f"127.0.0.1:{self.tls_port}",
            "ssl_options.cacertfile": str(self.pki.ca),
            "ssl_options.certfile": str(self.pki.server_cert),
            "ssl_options.keyfile": str(self.pki.server_key),
            "ssl_options.verify": "verify_peer",
            "ssl_options.fail_if_no_peer_cert": "true",
        }

    def stop(self) -> None:
        """Kill the node and remove the certificates."""
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def tls_url(self, vhost: str = "/", host: str = "127.0.0.1") -> str:
        """``amqps://guest:guest@HOST:PORT/VHOST`` (guest may log in over loopback)."""
        return f"amqps://guest:guest@{host}:{self.tls_port}/{quote(vhost, safe='')}"

    def plain_url(self, vhost: str = "/") -> str:
        """The node's plain ``amqp://`` URL."""
        assert self.cluster is not None
        return self.cluster.url(0, vhost)
