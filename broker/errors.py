"""One exception root for tasync, and the exit codes the CLI maps errors to.

Callers catch ``TasyncError`` at the edge (the CLI, a consumer's message handler) and let the
subclass pick the exit code or the quarantine reason. The tree stays shallow on purpose::

    TasyncError
     +-- ConfigError            bad user input or configuration (exit 1)
     |    +-- ValidationError   an object or change failed its schema or references
     |    +-- SendRefused       the network would refuse the alert; nothing was published
     +-- MessageError           a wire message that cannot be accepted (quarantined)
     +-- BrokerUnreachable      no broker URL answered (exit 3)
     +-- PublishError           the broker nacked or did not confirm in time (exit 1)
     +-- RemoteError            another node answered a request with an error (exit 1)
     +-- NoAnswer               nobody answered a request in time (exit 1)
     +-- FencedError            a change carries a stale epoch (rejected, audited)

``ExitCode`` holds the command-line contract of design section 6.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; other tools drive tasync by these numbers."""

    OK = 0
    FAILED = 1
    USAGE = 2
    BROKER_UNREACHABLE = 3


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


class PublishError(TasyncError):
    """The broker refused (nack) or did not confirm a publish in time."""


class RemoteError(TasyncError):
    """Another node answered a request with an error, which is carried in the message."""


class NoAnswer(TasyncError):
    """Nobody answered a request in time (for example no master is running)."""


class FencedError(TasyncError):
    """A change or request carries an epoch older than the one this node knows."""
