"""The job queue: one worker thread runs jobs one at a time on the engine; the queue is bounded.

``max_queue`` counts every admitted job: reserved (its body, read in full, is being decoded), waiting and
running. A full queue refuses at once (:class:`QueueFull`, with a retry estimate); :meth:`JobQueue.check` refuses
the same way before a body is read, reserving nothing: no slot is held while a body arrives. Cancelling a waiting
job frees its slot at once; a running job stops at its next denoising step (the progress callback raises
``Cancelled``). A job's decoded inputs are dropped when it finishes; finished jobs that clients poll are kept
only up to a count and an age. :class:`Stopper` stops it all at once when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import IncompatibleModelError, InputError, IPAdapterError
from ..jobs.engine import Engine
from ..jobs.job import Cancelled, Job, Result

log = logging.getLogger("ipadapter.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
CLOSED = "the server is shutting down; retry when it is back"
T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs; ``retry_after``: seconds until a slot is likely free."""

    def __init__(self, max_queue: int, retry_after: int) -> None:
        super().__init__(
            f"the queue is full ({max_queue} jobs waiting or running); retry in about {retry_after} s"
        )
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The queue is closed: the server is stopping."""


@dataclass
class Failure:
    """Why a job failed: HTTP status, error type and a one-line message."""

    status: int
    type: str
    message: str


def failure(error: BaseException) -> Failure:
    """The Failure an exception from a job stands for: the user's input (422) or the server's problem (500)."""
    message = " ".join(str(error).split())
    if isinstance(error, InputError | IncompatibleModelError):
        return Failure(422, "invalid_input", message)
    if isinstance(error, IPAdapterError):
        return Failure(500, "model_error", message)
    return Failure(500, "internal", f"internal error ({type(error).__name__}); see the server log")


@dataclass(eq=False)
class Ticket:
    """One admitted job and what became of it. ``finish`` turns the engine's Result into the response JSON."""

    id: str
    job: Job | None
    finish: Callable[[Result], dict[str, Any]]
    kept: bool
    status: str = QUEUED
    step: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: Failure | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _callbacks: list[Callable[[], None]] = field(default_factory=list)
    _callbacks_lock: threading.Lock = field(default_factory=threading.Lock)

    def on_finish(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the worker thread) when the job ends; at once if it has ended."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Slot:
    """A reserved place in the queue: submit a job into it, or release it (a context manager releases)."""

    def __init__(self, queue: JobQueue) -> None:
        self._queue: JobQueue | None = queue

    def submit(self, job: Job, finish: Callable[[Result], dict[str, Any]], *, kept: bool) -> Ticket:
        queue, self._queue = self._queue, None
        if queue is None:
            raise RuntimeError("this slot was used or released already")
        return queue._enqueue(job, finish, kept)

    def release(self) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue._release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class JobQueue:
    """A bounded queue in front of one :class:`Engine`, run by one worker thread."""

    def __init__(
        self, engine: Engine, max_queue: int, *, keep_finished: int = 64, keep_seconds: float = 600.0
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.keep_finished = keep_finished
        self.keep_seconds = keep_seconds
        self._lock = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: Ticket | None = None
        self._active = 0  # reserved + waiting + running
        self._jobs: dict[str, Ticket] = {}  # kept tickets by id (all states)
        self._finished: OrderedDict[str, Ticket] = OrderedDict()  # kept finished tickets, oldest first
        self._seconds = 1.0  # running mean of a job's run time, for Retry-After
        self._closed = False
        self.completed = 0
        self._thread = threading.Thread(target=self._work, name="ipadapter-worker", daemon=True)
        self._thread.start()

    # -- admission ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """ShuttingDown or QueueFull now, as :meth:`reserve` would, reserving nothing (before reading a body)."""
        with self._lock:
            self._admissible()

    def reserve(self) -> Slot:
        """A slot for one job, or QueueFull. Reserve once the body is in, before decoding it."""
        with self._lock:
            self._admissible()
            self._active += 1
        return Slot(self)

    def _admissible(self) -> None:  # under the lock
        if self._closed:
            raise ShuttingDown(CLOSED)
        if self._active >= self.max_queue:
            raise QueueFull(self.max_queue, self.retry_after())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean run time times the jobs ahead (at least 1)."""
        ahead = max(1, self._active)
        return max(1, min(3600, math.ceil(self._seconds * ahead)))

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _enqueue(self, job: Job, finish: Callable[[Result], dict[str, Any]], kept: bool) -> Ticket:
        ticket = Ticket(secrets.token_urlsafe(12), job, finish, kept, total=job.steps or 0)
        with self._lock:
            if self._closed:
                self._active -= 1
                raise ShuttingDown(CLOSED)
            self._prune()
            if kept:
                self._jobs[ticket.id] = ticket
            self._waiting.append(ticket)
            self._lock.notify_all()
        return ticket

    # -- queries and cancelling -----------------------------------------------------------------------------
    def get(self, job_id: str) -> Ticket | None:
        with self._lock:
            self._prune()
            return self._jobs.get(job_id)

    def position(self, ticket: Ticket) -> int | None:
        """1 for the next job to run, None when not waiting."""
        with self._lock:
            for i, waiting in enumerate(self._waiting):
                if waiting is ticket:
                    return i + 1
        return None

    def cancel(self, ticket: Ticket) -> None:
        """A waiting job is cancelled now (its slot freed); a running one stops at its next step."""
        with self._lock:
            ticket.cancel_requested.set()
            if ticket.status != QUEUED or ticket not in self._waiting:
                return
            self._waiting.remove(ticket)
            self._active -= 1
            self._end(ticket, CANCELLED)
        self._notify(ticket)

    def forget(self, ticket: Ticket) -> None:
        """Drop a finished job's record (its result) now."""
        with self._lock:
            self._jobs.pop(ticket.id, None)
            self._finished.pop(ticket.id, None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            running = 1 if self._running is not None else 0
            return {
                "running": running,
                "waiting": len(self._waiting),
                "active": self._active,
                "max_queue": self.max_queue,
                "kept": len(self._jobs),
                "completed": self.completed,
                "worker_alive": self._thread.is_alive(),
            }

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the worker: :meth:`shutdown`, then wait up to ``timeout`` s for the worker."""
        self.shutdown()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def shutdown(self) -> None:
        """Close the queue without waiting: refuse new jobs, cancel the waiting ones now and ask the running one
        to stop at its next step (the worker then ends). Safe to call again."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._active -= len(waiting)
            if self._running is not None:
                self._running.cancel_requested.set()
            for ticket in waiting:
                ticket.cancel_requested.set()
                self._end(ticket, CANCELLED)
            self._lock.notify_all()
        for ticket in waiting:
            self._notify(ticket)

    # -- the worker -----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                ticket = self._waiting.popleft()
                ticket.status, ticket.started = RUNNING, time.time()
                self._running = ticket
            self._run(ticket)

    def _run(self, ticket: Ticket) -> None:
        status, started = DONE, time.perf_counter()

        def progress(done: int, total: int) -> None:
            ticket.step, ticket.total = done, total
            if ticket.cancel_requested.is_set():
                raise Cancelled(f"job {ticket.id} cancelled")

        try:
            if ticket.cancel_requested.is_set():
                raise Cancelled(f"job {ticket.id} cancelled")
            assert ticket.job is not None
            result = self.engine.run(ticket.job, progress=progress)
            ticket.job = None  # drop the decoded inputs before encoding the outputs
            ticket.result = ticket.finish(result)
            del result
        except Cancelled:
            status = CANCELLED
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error, the worker goes on
            status, ticket.error = FAILED, failure(e)
            if ticket.error.status >= 500:
                log.exception("job %s failed", ticket.id)
        finally:
            ticket.job = None
            seconds = time.perf_counter() - started
            with self._lock:
                self._running = None
                self._active -= 1
                if status == DONE:
                    self._seconds = 0.7 * self._seconds + 0.3 * seconds if self.completed else seconds
                    self.completed += 1
                self._end(ticket, status)
            self._notify(ticket)

    # -- bookkeeping (under the lock) -----------------------------------------------------------------------
    def _end(self, ticket: Ticket, status: str) -> None:
        ticket.status, ticket.finished = status, time.time()
        ticket.job = None
        if ticket.kept and ticket.id in self._jobs:
            self._finished[ticket.id] = ticket
            self._prune()

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond ``keep_finished`` or older than ``keep_seconds``."""
        limit = time.time() - self.keep_seconds
        while self._finished:
            job_id, oldest = next(iter(self._finished.items()))
            if len(self._finished) <= self.keep_finished and (oldest.finished or 0) >= limit:
                break
            del self._finished[job_id]
            self._jobs.pop(job_id, None)

    def _notify(self, ticket: Ticket) -> None:
        with ticket._callbacks_lock:
            ticket._done.set()
            callbacks, ticket._callbacks = ticket._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a waiter that went away must not stop the worker
                log.debug("a finish callback failed", exc_info=True)


def job_view(ticket: Ticket, queue: JobQueue) -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} shows it."""
    view: dict[str, Any] = {
        "id": ticket.id,
        "status": ticket.status,
        "progress": {"step": ticket.step, "total": ticket.total},
    }
    if ticket.status == QUEUED:
        view["position"] = queue.position(ticket)
    if ticket.status == RUNNING and ticket.cancel_requested.is_set():
        view["cancel_requested"] = True
    if ticket.status == DONE and ticket.result is not None:
        result = dict(ticket.result)
        queued = (ticket.started or ticket.created) - ticket.created
        result["seconds"] = {
            **result["seconds"],
            "queued": round(queued, 3),
            "total": round((ticket.finished or time.time()) - ticket.created, 3),
        }
        view["result"] = result
    if ticket.status == FAILED and ticket.error is not None:
        view["error"] = {"type": ticket.error.type, "message": ticket.error.message}
    return view


class Stopper:
    """The server's stop: cancel every job, close the queue and wake every request that waits on a body or a job.

    A woken request answers 503 at once instead of being cut off (a bare 500) when uvicorn's graceful-shutdown
    time runs out. Thread-safe and idempotent; requests of any event loop register with :meth:`watch`.
    """

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._lock = threading.Lock()
        self._watching: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}
        self.stopped = False

    def __call__(self) -> None:
        with self._lock:
            first, self.stopped = not self.stopped, True
            watching = list(self._watching.items())
        if first:
            log.info("stopping: cancelling every job")
        self.queue.shutdown()
        for event, loop in watching:
            with suppress(RuntimeError):  # that request's loop is gone
                loop.call_soon_threadsafe(event.set)

    async def first(self, work: Awaitable[T], timeout: float) -> T:
        """``work``'s result (or error) if it ends within ``timeout`` s; else TimeoutError, or ShuttingDown as soon
        as the server stops."""
        with self.watch() as stopping:
            task, stop = asyncio.ensure_future(work), asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait((task, stop), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for each in (task, stop):
                    each.cancel()
                await asyncio.gather(task, stop, return_exceptions=True)
        if not task.cancelled():
            return task.result()
        if stopping.is_set():
            raise ShuttingDown(CLOSED)
        raise asyncio.TimeoutError

    @contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        """An event of the running loop that is set when the server stops (at once if it has)."""
        event = asyncio.Event()
        with self._lock:
            if self.stopped:
                event.set()
            else:
                self._watching[event] = asyncio.get_running_loop()
        try:
            yield event
        finally:
            with self._lock:
                self._watching.pop(event, None)
