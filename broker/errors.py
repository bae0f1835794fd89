"""One exception root for tasync, and the exit codes the CLI maps errors to.

Callers catch ``TasyncError`` at the edge (the CLI, a consumer's message handler) and let the
subclass pick the exit code or the quarantine reason. The tree stays shallow on purpose::

    TasyncError
     +-- ConfigError            bad user input or configuration (exit 1)
     |    +-- ValidationError   an object or change failed its schema or references
     |    +-- UnknownNode       a command named a node the network does not know
     |    +-- SendRefused       the network would refuse the alert; nothing was published
     +-- MessageError           a wire message that cannot be accepted (quarantined)
     +-- BrokerUnreachable      no broker URL answered (exit 3)
     +-- TopologyMissing        the virtual host lacks what `tasync broker setup` declares
     +-- PublishError           the broker nacked or did not confirm in time (exit 1)
     +-- RemoteError            another node answered a request with an error (exit 1)
     +-- ImportIncomplete       an import's parts did not all reach the master (resent)
     +-- ConnectionLost         the broker connection broke in the middle of a command (exit 3)
     +-- NoAnswer               nobody answered a request in time (exit 1)
     +-- WaitTimedOut           ``tasync wait`` ran out of time (exit 1)
     +-- FencedError            a change carries a stale epoch (rejected, audited)
     |    +-- SeatLost          the master lost the broker's master seat (no commit reported)

``ExitCode`` holds the command-line contract (docs/cli.md).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; other tools drive tasync by these numbers.

    ``tasync status`` is a health check: 0 when every known node is alive, ready and in
    sync, else the first of the degraded states below that applies (most severe first).
    """

    OK = 0
    FAILED = 1
    USAGE = 2
    BROKER_UNREACHABLE = 3
    NO_MASTER = 4
    NODE_DOWN = 5
    NOT_IN_SYNC = 6
    STRANDED_LISTS = 7


class TasyncError(Exception):
    """Root of all tasync errors."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(TasyncError):
    """Invalid user input or configuration."""


class ValidationError(ConfigError):
    """An object or change failed its schema or its references.

    Attributes:
        errors: field path -> messages, as marshmallow reports them, for ``--json`` output.
    """

    def __init__(self, message: str, *, errors: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


class UnknownNode(ConfigError):
    """A command named a node that is neither a ``node`` object of the network nor running.

    Said at once, with the names the network knows, rather than after waiting for an answer
    that cannot come: a typo should not look like a dead node.
    """


class SendRefused(ConfigError):
    """Every node would refuse the alert (unsigned, a retired key, a wrong secret).

    Raised by a sender before it publishes, so the alert is not quarantined by every node
    while the sender reports success.
    """


class MessageError(TasyncError):
    """A wire message that cannot be accepted; consumers quarantine it with this reason."""


class BrokerUnreachable(TasyncError):
    """No broker URL answered; the message names the URLs without their passwords."""

    exit_code = ExitCode.BROKER_UNREACHABLE


class TopologyMissing(TasyncError):
    """The broker answers but the virtual host lacks tasync's exchanges and queues.

    Not "unreachable": retrying cannot help until an admin runs ``tasync broker setup``, and
    the message says so.
    """


class PublishError(TasyncError):
    """The broker refused (nack) or did not confirm a publish in time."""


class RemoteError(TasyncError):
    """Another node answered a request with an error, which is carried in the message.

    Attributes:
        error_type: the class name of the error on the answering node (``ValidationError``).
        data: what the node sent with it: ``errors`` (field -> messages) and the like.
    """

    def __init__(self, message: str, *, error_type: str | None = None,
                 data: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.data = data or {}


class ImportIncomplete(TasyncError):
    """The master does not hold every part of an import (it restarted, or another took over).

    Attributes:
        data: ``{"missing": [part, ...]}``, the parts the client has to send again.
    """

    def __init__(self, message: str, *, missing: list[int]) -> None:
        super().__init__(message)
        self.data = {"missing": missing}


class ConnectionLost(TasyncError):
    """The connection to the broker broke in the middle of a command (exit 3)."""

    exit_code = ExitCode.BROKER_UNREACHABLE


class NoAnswer(TasyncError):
    """Nobody answered a request in time (for example no master is running)."""


class WaitTimedOut(TasyncError):
    """What ``tasync wait`` waited for did not happen in time; the message says what it saw."""


class FencedError(TasyncError):
    """A change or request carries an epoch older than the one this node knows."""


class SeatLost(FencedError):
    """This node does not (or no longer) hold the master's seat on the broker (``broker.seat``).

    A change is reported committed only while its master holds the seat, so a master that
    lost it refuses to commit, and a commit caught by the loss is answered with this error,
    never with "committed".
    """
