"""Runs a delivery plan with retries and backoff, and writes what happened to the trail.

Delivery goes in rounds. Each round tries every destination that is still pending: in an ``all``
group each member, in a ``sequence`` group the members in order until one succeeds (so
escalation to the next member is immediate, not after the first one's retries). A destination
that fails with a retryable error stays pending; between rounds the executor waits with
exponential backoff. After ``attempts`` rounds whatever is still pending has failed, and the
worker dead-letters the alert.

Results per alert: ``delivered`` (every branch that had to deliver did), ``skipped`` (nothing
was due: all destinations were outside their schedules) or ``failed``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tasync.broker.alerts import Alert
from tasync.broker.audit import Trail
from tasync.broker.errors import AttemptFailed, ConfigError, DeliveryAborted, ResolveError
from tasync.broker.events import Event
from tasync.broker.settings import (
    ENV_DELIVERY_ATTEMPTS,
    ENV_DELIVERY_BACKOFF,
    ENV_DELIVERY_TIMEOUT,
    delivery_retry_from_env,
)
from tasync.consumers.delivery import channels
from tasync.consumers.delivery.resolve import (
    Group,
    Leaf,
    Lookup,
    Plan,
    closed_reason,
    leaves,
    resolve,
)

log = logging.getLogger("tasync.delivery")

DELIVERED, FAILED, SKIPPED, RETRY = "delivered", "failed", "skipped", "retry"
_FIELD_RE = re.compile(r"\{(id|source|target|subject|priority|node|destination)\}")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard to try a failing destination.

    Attributes:
        attempts: rounds in all (1 means no retry).
        backoff_s: wait after the first failed round; doubles after each further one.
        max_backoff_s: longest single wait.
        timeout_s: time limit of one network attempt.
    """

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    timeout_s: float = channels.DEFAULT_TIMEOUT_S

    def delay(self, failed_rounds: int) -> float:
        """The wait after ``failed_rounds`` (1, 2, ...) rounds that left work pending."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (failed_rounds - 1)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """The policy from ``$TASYNC_DELIVERY_ATTEMPTS``/``_BACKOFF_S``/``_TIMEOUT_S``.

        Raises:
            ConfigError: a variable is set to something that is not a positive number.
        """
        raw_attempts, raw_backoff, raw_timeout = delivery_retry_from_env(environ)
        default = cls()
        try:
            attempts = int(raw_attempts or default.attempts)
            backoff = float(raw_backoff or default.backoff_s)
            timeout = float(raw_timeout or default.timeout_s)
        except ValueError:
            attempts = 0
        if attempts < 1 or backoff < 0 or timeout <= 0:
            raise ConfigError(f"{ENV_DELIVERY_ATTEMPTS} must be >= 1, {ENV_DELIVERY_BACKOFF} >= 0 "
                              f"and {ENV_DELIVERY_TIMEOUT} > 0")
        return cls(attempts=attempts, backoff_s=backoff, timeout_s=timeout)


@dataclass
class Progress:
    """How far the delivery of one alert got: its plan, per-destination states, rounds done.

    ``trail`` holds fields the worker adds to this alert's ``alert.delivered`` and
    ``alert.failed`` lines (who sent it, when it was made), so ``tasync trace`` can tell its
    story from those lines alone: the trail costs one line per destination, no more.
    """

    plan: Plan
    now: dt.datetime
    states: dict[str, tuple[str, str]] = field(default_factory=dict)
    rounds: int = 0
    trail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of one alert.

    Attributes:
        status: ``delivered``, ``failed`` or ``skipped`` (``retry`` only with ``max_rounds``).
        delivered: destinations that took it.
        failed: destination -> last reason, for those that never did.
        skipped: destination -> why it was not used (schedule).
        rounds: delivery rounds used.
        progress: for a ``retry`` outcome (``run`` with ``max_rounds``), where to resume.
    """

    status: str
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    progress: Progress | None = None

    @property
    def reason(self) -> str:
        """A one-line summary of the failures, for the trail and dead-letter headers."""
        return "; ".join(f"{d}: {r}" for d, r in self.failed.items())


def render_subject(template: str | None, alert: Alert, *, node: str, destination: str) -> str:
    """The subject for one destination: its template with ``{field}``s filled, or a default.

    Only named fields are replaced (no ``str.format``), so a template can never reach into
    object attributes.
    """
    default = alert.subject or alert.text.strip().splitlines()[0][:80]
    if not template:
        return default
    values = {"id": alert.id, "source": alert.source, "target": alert.target,
              "subject": default, "priority": str(alert.priority), "node": node,
              "destination": destination}
    return _FIELD_RE.sub(lambda m: values[m.group(1)], template)


def plan_is_local(plan: Plan) -> bool:
    """Whether every destination of ``plan`` is a local file."""
    return all(channels.scheme_of(leaf.url) == "file" for leaf in leaves(plan))


class PlanCache:
    """Resolved plans by target, kept while the configuration's seq stays the same.

    Resolving reads the target and every member from the store (a query and a JSON parse
    each) for every alert; a node delivering thousands of alerts a second to a few targets
    resolved the same plan again each time. ``refresh`` (the worker calls it once per batch
    of alerts it takes) compares the store's seq with the one the plans were made at and
    forgets them all when it moved, so an alert is delivered by the configuration its batch
    was taken under. A failed resolution (an unknown target) is kept as well.

    Only the consumer thread uses it. The seq is read before a plan is resolved, so a plan
    is never older than the seq it is kept under.
    """

    def __init__(self, store: Lookup, config_seq: Callable[[], int]) -> None:
        self.store = store
        self.config_seq = config_seq
        self.seq: int | None = None
        self._plans: dict[tuple[str, str], Plan | str] = {}  # a str: why it cannot resolve
        self._local: dict[Plan, bool] = {}

    def refresh(self) -> None:
        """Forget every plan if the configuration changed since they were resolved."""
        seq = self.config_seq()
        if seq != self.seq:
            self._plans.clear()
            self._local.clear()
            self.seq = seq

    def resolve(self, kind: str, name: str) -> Plan:
        """The plan of ``kind``/``name``, resolved once per seq.

        Raises:
            ResolveError: as ``resolve`` does (also from the cache).
        """
        key = (kind, name)
        plan = self._plans.get(key)
        if plan is None:
            try:
                plan = resolve(self.store, kind, name)
            except ResolveError as exc:
                plan = str(exc)
            self._plans[key] = plan
        if isinstance(plan, str):
            raise ResolveError(plan)  # a new one each time: a raised one keeps its traceback
        return plan

    def is_local(self, plan: Plan) -> bool:
        """``plan_is_local``, computed once per plan."""
        local = self._local.get(plan)
        if local is None:
            local = self._local[plan] = plan_is_local(plan)
        return local


class Executor:
    """Delivers alerts for one node; safe to use from several threads at once.

    Args:
        node: the delivering node's name (written into every payload).
        store: where destinations, groups and schedules are looked up.
        trail: the audit trail.
        policy: retries and timeouts.
        wait: sleeps for the given seconds and returns True if the worker is stopping.
        send: the channel dispatcher (tests substitute a fake).
        defer_trail: keep the per-alert trail lines for the caller's ``trail.flush()``
            (the delivery worker flushes them before it acknowledges the alerts).
        config_seq: the store's configuration seq; with it, resolved plans are kept until
            ``refresh_plans`` sees the seq move (see ``PlanCache``).
    """

    def __init__(self, *, node: str, store: Lookup, trail: Trail, policy: RetryPolicy,
                 wait: Callable[[float], bool],
                 send: Callable[..., None] = channels.send, defer_trail: bool = False,
                 config_seq: Callable[[], int] | None = None) -> None:
        self.node = node
        self.store = store
        self.trail = trail
        self.policy = policy
        self.wait = wait
        self.send = send
        self._line = trail.defer if defer_trail else trail.event
        self.plans = PlanCache(store, config_seq) if config_seq is not None else None

    def refresh_plans(self) -> None:
        """Forget the resolved plans if the configuration changed since they were made."""
        if self.plans is not None:
            self.plans.refresh()

    def prepare(self, alert: Alert) -> Progress | Outcome:
        """Resolve the alert's target: its progress record, or a failed outcome when unknown."""
        try:
            if self.plans is not None:
                plan = self.plans.resolve(alert.target_kind, alert.target)
            else:
                plan = resolve(self.store, alert.target_kind, alert.target)
        except Exception as exc:
            self._line(Event.ALERT_FAILED, id=alert.id, source=alert.source,
                       target=alert.target, reason=str(exc))
            return Outcome(FAILED, failed={alert.target: str(exc)}, rounds=0)
        return Progress(plan=plan, now=dt.datetime.now(dt.UTC))

    def is_local(self, progress: Progress) -> bool:
        """Whether every destination is a local file: fast enough to deliver on the consumer."""
        if self.plans is not None:
            return self.plans.is_local(progress.plan)
        return plan_is_local(progress.plan)

    def run(self, alert: Alert, progress: Progress | None = None, *,
            max_rounds: int | None = None) -> Outcome:
        """Deliver one alert to its target, retrying, and report the outcome.

        Args:
            alert: the alert.
            progress: where an earlier call stopped (from ``prepare`` or a ``retry`` outcome).
            max_rounds: stop after this many rounds in all with a ``retry`` outcome carrying
                the progress, instead of waiting; the worker uses 1 to try local files inline.

        Raises:
            DeliveryAborted: the worker is stopping; nothing was acknowledged, the broker
                will hand the alert out again.
        """
        if progress is None:
            prepared = self.prepare(alert)
            if isinstance(prepared, Outcome):
                return prepared
            progress = prepared
        while True:
            if progress.rounds and self.wait(self.policy.delay(progress.rounds)):
                raise DeliveryAborted(alert.id)
            progress.rounds += 1
            status = self._round(progress.plan, alert, progress)
            if status != RETRY:
                return self._finish(alert, progress, status)
            if progress.rounds >= self.policy.attempts:
                return self._finish(alert, progress, FAILED)
            if max_rounds is not None and progress.rounds >= max_rounds:
                return Outcome(RETRY, rounds=progress.rounds, progress=progress)

    def _finish(self, alert: Alert, progress: Progress, status: str) -> Outcome:
        outcome = Outcome(status, rounds=progress.rounds)
        for name, (state, reason) in progress.states.items():
            if state == DELIVERED:
                outcome.delivered.append(name)
            elif state == SKIPPED:
                outcome.skipped[name] = reason
            elif state in (FAILED, RETRY):
                outcome.failed[name] = reason
                self._line(Event.ALERT_FAILED, id=alert.id, source=alert.source,
                           destination=name, attempts=progress.rounds, reason=reason,
                           **progress.trail)
        return outcome

    def _round(self, plan: Plan, alert: Alert, progress: Progress) -> str:
        if isinstance(plan, Leaf):
            return self._leaf(plan, alert, progress)
        return self._group(plan, alert, progress)

    def _group(self, group: Group, alert: Alert, progress: Progress) -> str:
        results: list[str] = []
        for member in group.members:
            result = self._round(member, alert, progress)
            results.append(result)
            if group.mode == "sequence" and result == DELIVERED:
                return DELIVERED
        if RETRY in results:
            return RETRY
        if FAILED in results:
            return FAILED
        return DELIVERED if DELIVERED in results else SKIPPED

    def _leaf(self, leaf: Leaf, alert: Alert, progress: Progress) -> str:
        states = progress.states
        state = states.get(leaf.name)
        if state is not None and state[0] != RETRY:
            return state[0]
        if state is None:
            closed = closed_reason(self.store, leaf, progress.now)
            if closed is not None:
                states[leaf.name] = (SKIPPED, closed)
                self._line(Event.ALERT_SKIPPED, id=alert.id, source=alert.source,
                           destination=leaf.name, reason=closed)
                return SKIPPED
        payload = self.payload(alert, leaf)
        try:
            self.send(leaf.url, payload, timeout_s=self.policy.timeout_s)
        except AttemptFailed as exc:
            result = RETRY if exc.retryable else FAILED
            states[leaf.name] = (result, str(exc))
            log.warning("alert %s to %s failed (%s)%s", alert.id, leaf.name, exc,
                        "; will retry" if exc.retryable else "")
            return result
        except Exception as exc:
            log.exception("alert %s to %s: unexpected channel error", alert.id, leaf.name)
            states[leaf.name] = (RETRY, f"unexpected error: {type(exc).__name__}")
            return RETRY
        states[leaf.name] = (DELIVERED, "")
        self._line(Event.ALERT_DELIVERED, id=alert.id, source=alert.source,
                   destination=leaf.name, list=".".join(alert.hosts),
                   attempts=progress.rounds, **progress.trail)
        return DELIVERED

    def payload(self, alert: Alert, leaf: Leaf) -> dict[str, Any]:
        """What a channel receives: the alert, the destination and who delivered it when.

        ``labels`` and ``annotations`` are there only when the alert has them, as objects, so
        a receiver reads ``runbook_url`` as a field rather than out of the text.
        """
        data = {
            "id": alert.id,
            "destination": leaf.name,
            "text": alert.text,
            "subject": render_subject(leaf.subject, alert, node=self.node, destination=leaf.name),
            "source": alert.source,
            "priority": alert.priority,
            "target_kind": alert.target_kind,
            "target": alert.target,
            "hosts": list(alert.hosts),
            "created_at": alert.created_at,
            "node": self.node,
            "delivered_at": time.time(),
        }
        if alert.labels is not None:
            data["labels"] = dict(alert.labels)
        if alert.annotations is not None:
            data["annotations"] = dict(alert.annotations)
        return data
