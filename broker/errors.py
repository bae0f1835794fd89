"""One exception root for tasync, and the exit codes the CLI maps errors to.

Callers catch ``TasyncError`` at the edge (the CLI, a consumer's message handler) and let the
subclass pick the exit code or the quarantine reason. The tree stays shallow on purpose::

    TasyncError
     +-- ConfigError            bad user input or configuration (exit 1)
     |    +-- InvalidObject     an object or change failed its schema or references
     |    +-- UnknownNode       a command named a node the network does not know
     |    +-- SendRefused       the network would refuse the alert; nothing was published
     |    +-- ResolveError      an alert's target cannot become a delivery plan
     +-- MessageError           a wire message that cannot be accepted (quarantined)
     +-- BrokerUnreachable      no broker URL answered (exit 3)
     +-- ConnectionLost         the broker connection broke in the middle of a command (exit 3)
     +-- TopologyMissing        the virtual host lacks what `tasync broker setup` declares
     +-- AccessDenied           the broker refused an operation to this user
     +-- BrokerAdminError       ``rabbitmqctl`` is missing or failed
     +-- PublishError           the broker nacked or did not confirm in time (exit 1)
     +-- RemoteError            another node answered a request with an error (exit 1)
     +-- NoAnswer               nobody answered a request in time (exit 1)
     +-- WaitTimedOut           ``tasync wait`` ran out of time (exit 1)
     +-- FencedError            a change carries a stale epoch (rejected, audited)
     |    +-- SeatLost          the master lost the broker's master seat (no commit reported)
     +-- GapError               a batch starts after the next expected seq (fetch first)
     +-- UnfillableGap          the change log no longer reaches back: a snapshot is needed
     +-- StoreDamaged           ``node.db`` cannot be read as a database
     +-- ImportIncomplete       an import's parts did not all reach the master (resent)
     +-- ImportMismatch         what the master committed differs from the import file
     +-- NotApplied             committed, but a backup did not answer (``--strict``)
     +-- NotIdentical           after recovery a node still differs from the master
     +-- IncompleteLog          the change log may not reach back to the point asked for
     +-- AttemptFailed          one delivery attempt failed (``retryable`` or not)
     +-- DeliveryAborted        the worker stops during a retry wait; nothing acknowledged
     +-- IntakeError            the HTTP intake's answers (each carries its HTTP status)
          +-- BadRequest        the request cannot become alerts (400)
          +-- TooLarge          larger than the intake takes at once; split it (413)
          +-- PostRefused       no or wrong token (401), not on the allow-list (403)
          +-- IntakeBusy        every sender stayed busy; nothing was queued (503)

One more lives here, outside the root on purpose: ``NotEmulated``, raised by the in-process
broker of the unit tests (``tasync.broker.memory``) when code asks it for a broker feature it does
not emulate. It is a ``NotImplementedError``, a mistake in a test's setup, so that no handler that
turns a ``TasyncError`` into an answer or a quarantine reason ever hides it.

Errors defined here and nowhere else: a reader finds every failure the product can report in
one file, and a name means one thing (``InvalidObject`` is tasync's; marshmallow's own
``ValidationError`` stays inside the schema code that turns it into ``InvalidObject``).

``ExitCode`` holds the command-line contract (docs/cli.md).
"""

from __future__ import annotations

import enum
from pathlib import Path


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


class InvalidObject(ConfigError):
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
        error_type: the class name of the error on the answering node (``InvalidObject``).
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
    """This node does not (or no longer) hold the master's seat (``tasync.broker.seat``).

    A change is reported committed only while its master holds the seat, so a master that
    lost it refuses to commit, and a commit caught by the loss is answered with this error,
    never with "committed".
    """


class AccessDenied(TasyncError):
    """The broker refused an operation (``ACCESS_REFUSED``): this user lacks a permission."""


class BrokerAdminError(TasyncError):
    """``rabbitmqctl`` is missing or failed; the message is its first error line."""


class GapError(TasyncError):
    """A batch starts after the next expected seq; the missing changes must be fetched first."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"gap in the change stream: expected seq {expected}, got {got}")
        self.expected = expected
        self.got = got


class UnfillableGap(TasyncError):
    """The change log no longer reaches back to the missing changes: a snapshot is needed."""


class StoreDamaged(TasyncError):
    """``node.db`` cannot be read as a database (overwritten, truncated mid-page, not SQLite)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is unreadable: {reason}")
        self.path = path
        self.reason = reason


class ImportMismatch(TasyncError):
    """What the master committed differs from the import file (exit 1)."""


class NotApplied(TasyncError):
    """Committed, but a known backup did not answer and ``--strict`` was given (exit 1)."""


class NotIdentical(TasyncError):
    """After recovery the node still differs from the master (exit 1)."""


class IncompleteLog(TasyncError):
    """The change log may no longer reach back to the point asked for (exit 1)."""


class IntakeError(TasyncError):
    """What the HTTP intake answers a caller with; ``status`` is the HTTP status code."""

    status = 400


class BadRequest(IntakeError, ValueError):
    """The request cannot become alerts; the message is the reason shown to the caller.

    Also a ``ValueError``: the payload parsers raise it where Python's own parsers raise that.
    """


class TooLarge(IntakeError, ValueError):
    """The request is larger than the intake takes at once; the caller should split it (413)."""

    status = 413


class PostRefused(IntakeError):
    """The client may not post (401: no or wrong token; 403: not on the allow-list)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class IntakeBusy(IntakeError):
    """Every sender stayed busy for the whole wait; the request was not queued (503)."""

    status = 503


class ResolveError(ConfigError):
    """An alert's target cannot be turned into a plan (unknown name, too deep); not retried."""


class AttemptFailed(TasyncError):
    """One delivery attempt to one destination failed.

    Attributes:
        retryable: whether a later attempt may succeed (a 503, a refused connection) or not
            (a 404, a refused recipient, a bad URL).
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class DeliveryAborted(TasyncError):
    """The worker is stopping during a retry wait; the alert stays unacknowledged."""


class NotEmulated(NotImplementedError):
    """The in-process broker (``memory://``) was asked for a feature it does not emulate."""
