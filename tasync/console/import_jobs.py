"""Configuration imports started from the console: one at a time, its progress in memory.

An import is ``tasync config import``'s (``tasync.cli_config.import_ops``): the file is read
and every object checked before anything is sent (``tasync.config_files``), then the parts
are staged on the master and committed there in one transaction, all or nothing. It runs on a
thread of its own so the page can follow it; the console keeps only what the page shows (how
many operations the master holds so far, then the result or the refusal), for the running
import and the last few finished ones, and forgets them when it restarts. The network keeps
the configuration.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from tasync.broker.connection import RECOVERABLE, describe
from tasync.broker.errors import RemoteError, TasyncError
from tasync.broker.settings import Settings
from tasync.cli_config import check_import, import_ops
from tasync.console.config_view import flatten

log = logging.getLogger("tasync.console")
#: Finished imports whose result stays on hand (their pages may still be open).
KEEP_FINISHED = 5


class JobState(enum.StrEnum):
    """Where an import is: sending, committed, or refused (nothing committed)."""

    RUNNING = "running"
    COMMITTED = "committed"
    REFUSED = "refused"


@dataclass
class ImportJob:
    """One import: who, which file, how far, and how it ended."""

    id: str
    user: str
    filename: str
    total: int
    done: int = 0
    state: JobState = JobState.RUNNING
    result: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def percent(self) -> int:
        """How much of the file the master holds, in whole percent."""
        return 100 if not self.total else int(self.done * 100 / self.total)


class Busy(Exception):
    """Another import is under way; the message names it."""


class ImportJobs:
    """The imports of one console process.

    Args:
        settings: how to reach the broker.
        timeout_s: how long an import may go without an answer from the master.
    """

    def __init__(self, settings: Settings, *, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, ImportJob] = OrderedDict()

    def get(self, job_id: str) -> ImportJob | None:
        """The import ``job_id``, while it runs or is among the last finished."""
        with self._lock:
            return self._jobs.get(job_id)

    def running(self) -> ImportJob | None:
        """The import under way, if any."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.state is JobState.RUNNING), None)

    def start(self, ops: list[dict[str, Any]], *, user: str, by: str,
              filename: str) -> ImportJob:
        """Start importing ``ops`` (already checked) on a thread; its job follows it.

        Raises:
            Busy: another import is under way (two would only wait for each other on the
                master, and their pages would be hard to tell apart).
        """
        with self._lock:
            for other in self._jobs.values():
                if other.state is JobState.RUNNING:
                    raise Busy(f"{other.user} is importing {other.filename} "
                               f"({other.percent}% sent): wait until it ends")
            job = ImportJob(secrets.token_hex(8), user, filename, len(ops))
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.state is not JobState.RUNNING]
            for old in finished[:max(0, len(finished) - KEEP_FINISHED)]:
                del self._jobs[old.id]
        threading.Thread(target=self._run, args=(job, ops, by), daemon=True,
                         name=f"import-{job.id}").start()
        return job

    def _run(self, job: ImportJob, ops: list[dict[str, Any]], by: str) -> None:
        def shown(done: int) -> None:
            job.done = done

        try:
            result = import_ops(self.settings, ops, timeout_s=self.timeout_s, shown=shown,
                                by=by)
            check_import(result, ops)
        except RemoteError as exc:
            errors = exc.data.get("errors")
            self._end(job, JobState.REFUSED, str(exc),
                      flatten(errors) if isinstance(errors, dict) else [])
        except TasyncError as exc:
            self._end(job, JobState.REFUSED, str(exc), [])
        except RECOVERABLE as exc:
            self._end(job, JobState.REFUSED,
                      f"lost the connection to the broker ({describe(exc)}); the import may "
                      "or may not have been committed: look at the configuration", [])
        except Exception as exc:  # a bug: end the job (it would block every later one)
            self._end(job, JobState.REFUSED, f"the import stopped: {type(exc).__name__}: "
                                             f"{exc}", [])
        else:
            job.result = {k: result.get(k) for k in ("count", "first_seq", "last_seq",
                                                     "epoch", "ops")}
            job.done = job.total
            self._end(job, JobState.COMMITTED, "", [])

    def _end(self, job: ImportJob, state: JobState, message: str, errors: list[str]) -> None:
        job.message, job.errors = message, errors
        job.state = state
        if state is JobState.COMMITTED:
            log.info("console: %r imported %s: %s operations, %s changes committed", job.user,
                     job.filename, job.result.get("ops"), job.result.get("count"))
        else:
            log.warning("console: %r could not import %s: %s", job.user, job.filename, message)
