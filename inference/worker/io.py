"""The worker's broker IO, beside the engine: every call the loop makes to its transport.

``WorkerIO`` takes new requests (and reclaims dead workers' ones), reads their images and
cancel marks, checks the running requests' cancel marks, sends heartbeats and publishes
events. ``Worker`` (``inference.worker.loop``, the thread that drives the engine) only
hands it events and heartbeats and takes from it what arrived; both directions go through
lists guarded by one ``threading.Condition``, so the engine's thread never waits on the
broker between two steps.

Two ways to drive it, the same code:

- threaded (``start``): its own thread repeats ``io_once`` and publishes whenever the
  engine's thread hands it events (``Worker.run``);
- inline: the caller runs ``io_once`` and ``publish_pending`` itself, on its own thread,
  between steps (``Worker.run_once``, the synchronous path the tests drive step by step,
  and ``WorkerConfig(io_thread=False)``, the loop as it was before this module).

Invariants:

- events are published in the order they were handed over, and a delivery's
  acknowledgement goes in the same ``publish`` as (after) its terminal event: nothing is
  acknowledged before it is answered, so a SIGKILL loses no request;
- a delivery taken from the broker stays here until it is handed over (with its images
  and cancel mark), also when the broker fails half-way; a slot counts as used from the
  moment its delivery is taken until its acknowledgement is published;
- a cancel mark is reported once per request; the engine's thread aborts it before its
  next step.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from inference.protocol import WorkerHeartbeat
from inference.worker.transport import (
    Delivery,
    Outgoing,
    ReplyState,
    TransportUnavailable,
    WorkerTransport,
)

logger = logging.getLogger("inference.worker")
_T = TypeVar("_T")

# How long the IO thread waits after the broker failed before it tries again: 50 ms, then
# twice as long each time, at most 0.5 s. Soon after a dropped connection, the first retry
# sends the heartbeat that subscribes the presence again (well within presence_grace_s).
_BACKOFF_FIRST_S = 0.05
_BACKOFF_S = 0.5
# After an outage the next claim pass waits this long: the other workers are reconnecting
# too, and until their first heartbeat they look gone (their keys may have expired).
_CLAIM_PAUSE_AFTER_OUTAGE_S = 2.0
# How long a closing IO thread keeps trying to publish what it still holds.
_CLOSE_PUBLISH_S = 5.0
# How long after the engine's thread built its last heartbeat the IO renews it: liveness is
# then the process's (docs/reliability.md), so an engine step longer than the heartbeat TTL
# does not make a healthy worker look dead, while an engine stuck longer than this lets
# the key expire and its requests be taken over.
_RENEW_MAX_S = 10.0


@dataclass(frozen=True)
class Arrival:
    """A delivery ready for the engine: its images read (those that still exist) and
    whether its cancel mark was already set when it was taken."""

    delivery: Delivery
    images: dict[str, bytes]
    cancelled: bool


class WorkerIO:
    """Every transport call of one worker; thread-safe between one IO driver and the loop.

    ``max_batch_size`` + ``prefetch`` bounds what it takes: deliveries taken but not yet
    acknowledged.
    """

    def __init__(
        self,
        *,
        transport: WorkerTransport,
        max_batch_size: int,
        claim_interval_s: float,
        prefetch: int = 0,
        idle_block_ms: int,
        poll_s: float = 0.01,
        renew_heartbeat_s: float = 0.0,
    ) -> None:
        self.transport = transport
        self.max_batch_size = max_batch_size
        self.max_held = max_batch_size + max(0, prefetch)
        self.claim_interval_s = claim_interval_s
        self.idle_block_ms = idle_block_ms
        self.poll_s = poll_s
        self.renew_heartbeat_s = renew_heartbeat_s  # 0: only the engine's beats are sent
        self._cond = threading.Condition()
        # Guarded by _cond: the hand-over in both directions and the IO thread's state.
        self._outbox: list[Outgoing] = []
        self._outbox_handovers = 0  # hand-overs not yet published (the loop's lag)
        self._beat: WorkerHeartbeat | None = None
        self._admissions: list[Arrival] = []
        self._cancels: set[str] = set()
        self._accepting = True
        self._fetching = False
        self._publishing = False
        self._ready = False
        self._closing = False
        self._unregister = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        # Only the IO driver's thread touches these.
        self._taken: list[Delivery] = []  # taken, images or cancel mark not read yet
        self._held: dict[str, str] = {}  # token -> request id: taken, not acknowledged
        self._reported: set[str] = set()  # request ids whose cancel went to the loop
        self._next_claim = 0.0
        self._beat_built_at = 0.0  # guarded by _cond: when the last beat was queued
        self._beats_sent = 0  # guarded by _cond
        self._sent_beat: WorkerHeartbeat | None = None  # the IO driver's: last one sent
        self._sent_at = 0.0

    # --- the loop's side (any thread) -------------------------------------------------

    def hand_over(self, outgoing: list[Outgoing]) -> None:
        """Queue ``outgoing`` for publication, after everything handed over before."""
        if not outgoing:
            return
        with self._cond:
            self._outbox.extend(outgoing)
            self._outbox_handovers += 1
            self._cond.notify_all()

    def queue_heartbeat(self, beat: WorkerHeartbeat) -> None:
        """Send ``beat`` at the next occasion (a newer one replaces one not sent yet)."""
        with self._cond:
            self._beat = beat
            self._beat_built_at = time.monotonic()
            self._cond.notify_all()

    def wait_heartbeat_sent(self, timeout_s: float) -> bool:
        """Wait until a heartbeat reached the broker (the worker is registered); False
        after ``timeout_s`` or when the IO thread failed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._beats_sent == 0 and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._beats_sent > 0

    def take(self, wait_s: float = 0.0) -> tuple[list[Arrival], set[str]]:
        """What arrived since the last call: deliveries to admit and ids to abort. Waits up
        to ``wait_s`` for something when there is nothing yet (never for the broker)."""
        with self._cond:
            if wait_s > 0 and not (self._admissions or self._cancels or self._error):
                self._cond.wait(wait_s)
            admissions, self._admissions = self._admissions, []
            cancels, self._cancels = self._cancels, set()
            return admissions, cancels

    def wait_published(self, max_handovers: int, timeout_s: float) -> bool:
        """Wait until at most ``max_handovers`` hand-overs are unpublished; False when
        they still are after ``timeout_s`` (the broker is down) or the IO thread failed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._outbox_handovers > max_handovers and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._error is None

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    def settled(self) -> bool:
        """Nothing taken, handed over or queued, and no fetch under way (a stopped loop
        that sees this after ``stop_accepting`` may return)."""
        with self._cond:
            return not (
                self._taken
                or self._admissions
                or self._outbox
                or self._publishing
                or self._fetching
            )

    def backlog(self) -> int:
        """Deliveries taken but not yet handed to the engine (for the metrics)."""
        with self._cond:
            return len(self._taken) + len(self._admissions)

    def check(self) -> None:
        """Raise what ended the IO thread, if anything did."""
        with self._cond:
            error = self._error
        if error is not None:
            raise RuntimeError("the worker's IO thread failed") from error

    # --- threaded driver --------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        """Run the IO on its own thread (``prepare``, then ``io_once`` until ``close``)."""
        self._stop = stop
        # In the caller's context: its log lines carry the fields bound for the process
        # (``inference.worker.logs.bind_process``: the model and worker id).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name="worker-io", daemon=True
        )
        self._thread.start()

    def wait_ready(self, stop: threading.Event) -> bool:
        """Wait until the IO thread joined the queue; False when stopped first."""
        with self._cond:
            while not self._ready and self._error is None and not stop.is_set():
                self._cond.wait(0.05)
            ready = self._ready
        self.check()
        return ready

    def close(self, *, unregister: bool, timeout_s: float = _CLOSE_PUBLISH_S + 5.0) -> None:
        """Stop the IO thread after it published what it holds (trying for a few seconds)
        and, when ``unregister``, removed this worker's heartbeat."""
        thread = self._thread
        with self._cond:
            self._closing = True
            self._unregister = unregister
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("the worker's IO thread did not stop in %.0fs", timeout_s)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything handed over is published (threaded) or publish it now
        (inline); False when the broker did not take it."""
        if self._thread is None:
            try:
                self.publish_pending()
            except TransportUnavailable:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._outbox or self._publishing) and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._error is None

    def _run(self) -> None:
        stop = self._stop
        assert stop is not None
        try:
            if not self.prepare(stop, closing=lambda: self._closing):
                return
            with self._cond:
                self._ready = True
                self._cond.notify_all()
            backoff = _BACKOFF_FIRST_S
            while not self._closing:
                try:
                    self.io_once()
                except TransportUnavailable as exc:
                    logger.warning("broker unavailable, retrying in %.2fs: %s", backoff, exc)
                    self._next_claim = max(
                        self._next_claim, time.monotonic() + _CLAIM_PAUSE_AFTER_OUTAGE_S
                    )
                    with self._cond:
                        if not self._closing:
                            self._cond.wait(backoff)
                    backoff = min(2 * backoff, _BACKOFF_S)
                    continue
                backoff = _BACKOFF_FIRST_S
                self._wait_for_work()
            self._finish()
        except BaseException as exc:
            logger.exception("the worker's IO thread failed")
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _wait_for_work(self) -> None:
        """Sleep until there is something to publish or send, or it is time to look for
        new requests and cancel marks again. When nothing is held the next ``io_once``
        blocks in the broker's own read instead (``idle_block_ms``)."""
        with self._cond:
            if self._outbox or self._beat is not None or self._closing:
                return
            idle = not self._held and not self._taken
            if idle and self._accepting_now():
                return
            self._cond.wait(self.poll_s)

    def _finish(self) -> None:
        deadline = time.monotonic() + _CLOSE_PUBLISH_S
        while True:
            try:
                self.publish_pending()
                break
            except TransportUnavailable as exc:
                if time.monotonic() > deadline:
                    logger.warning("could not publish %d replies: %s", len(self._outbox), exc)
                    break
                time.sleep(_BACKOFF_S)
        if self._unregister:
            try:
                self.transport.unregister()
            except TransportUnavailable:
                logger.warning("could not unregister this worker")

    # --- the IO driver's side (the IO thread, or the loop's thread inline) -------------

    def prepare(self, stop: threading.Event, closing: Callable[[], bool] = lambda: False) -> bool:
        """Join the queue (``setup``) and take back this worker id's own pending requests,
        retrying while the broker is down; False when stopped first."""
        self._stop = stop

        def set_up() -> bool:  # True when done: _retrying answers None only when stopped
            self.transport.setup()
            return True

        if _retrying(stop, closing, set_up) is None:
            return False
        # Our own pending entries can only exist if a previous process used this worker id.
        own = _retrying(stop, closing, lambda: self.transport.claim_stale(include_own=True))
        if own is None:
            return False
        self._take(own)
        return True

    def io_once(self, *, accept_new: bool = True) -> None:
        """One round of IO: publish, heartbeat, claim and fetch, read images and cancel
        marks, hand over. Raises ``TransportUnavailable`` (what it took is kept)."""
        self.publish_pending()
        now = time.monotonic()
        with self._cond:
            beat, self._beat = self._beat, None
            built_at = self._beat_built_at
        if (
            beat is None
            and self._sent_beat is not None
            and 0 < self.renew_heartbeat_s <= now - self._sent_at
            and now - built_at < _RENEW_MAX_S
        ):
            beat = self._sent_beat  # the engine is mid-step: renew the last one
        if beat is not None:
            try:
                self.transport.heartbeat(beat)
            except TransportUnavailable:
                with self._cond:
                    self._beat = self._beat or beat
                raise
            self._sent_beat, self._sent_at = beat, now
            with self._cond:
                self._beats_sent += 1
                self._cond.notify_all()
        if accept_new:
            self._fetch()
            self.publish_pending()  # what the engine handed over meanwhile goes out first
        self._read_marks()

    def publish_pending(self) -> None:
        """Publish everything handed over, in order, in one ``transport.publish``."""
        with self._cond:
            if not self._outbox:
                return
            batch, self._outbox = self._outbox, []
            handovers, self._outbox_handovers = self._outbox_handovers, 0
            self._publishing = True
        try:
            self.transport.publish(batch)
        except BaseException:
            with self._cond:
                self._outbox[:0] = batch  # first again: order is kept
                self._outbox_handovers += handovers
                self._publishing = False
                self._cond.notify_all()
            raise
        for out in batch:
            if out.ack_token is not None:
                rid = self._held.pop(out.ack_token, None)
                if rid is not None:
                    self._reported.discard(rid)
        with self._cond:
            self._publishing = False
            self._cond.notify_all()

    def _accepting_now(self) -> bool:
        """Call with ``_cond`` held. A SIGTERM that arrived during this round's broker
        calls must already keep the fetch from taking more work."""
        return self._accepting and not (self._stop is not None and self._stop.is_set())

    def _fetch(self) -> None:
        with self._cond:
            if not self._accepting_now():
                return
            self._fetching = True
        try:
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + self.claim_interval_s
                self._take(self.transport.claim_stale())
            free = self.max_held - len(self._held)
            if free > 0:
                block_ms = 0 if self._held else self.idle_block_ms
                self._take(self.transport.fetch(free, block_ms))
        finally:
            with self._cond:
                self._fetching = False

    def _take(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        for delivery in deliveries:
            self._held[delivery.token] = delivery.request.request_id
        with self._cond:
            self._taken.extend(deliveries)

    def _read_marks(self) -> None:
        """One cancel-mark read for the new deliveries and the running requests; then the
        new deliveries' images; then hand both over."""
        with self._cond:
            taken = list(self._taken)
        new_ids = [d.request.request_id for d in taken]
        taken_tokens = {d.token for d in taken}
        running = [
            rid
            for token, rid in self._held.items()
            if token not in taken_tokens and rid not in self._reported
        ]
        ids = new_ids + running
        cancelled = self.transport.cancelled(ids) if ids else set()
        ready: list[Arrival] = []
        try:
            for delivery in taken:
                is_cancelled = delivery.request.request_id in cancelled
                ready.append(Arrival(delivery, self._images(delivery, is_cancelled), is_cancelled))
        finally:
            cancels = {rid for rid in running if rid in cancelled}
            self._reported |= cancels
            with self._cond:
                del self._taken[: len(ready)]
                self._admissions.extend(ready)
                self._cancels |= cancels
                if ready or cancels:
                    self._cond.notify_all()

    def _images(self, delivery: Delivery, cancelled: bool) -> dict[str, bytes]:
        request = delivery.request
        finished = delivery.reply_state in (ReplyState.FINISHED, ReplyState.STREAMED)
        refs = request.image_refs()
        if not refs or cancelled or finished:
            return {}  # answered without the engine: its images are not needed
        wanted = sorted({ref.sha256 for ref in refs})
        return self.transport.fetch_images(request.tenant_id, wanted)


def _retrying(
    stop: threading.Event, closing: Callable[[], bool], fn: Callable[[], _T]
) -> _T | None:
    """Call ``fn`` until the broker answers, or ``stop`` is set or ``closing()`` (None)."""
    while not stop.is_set() and not closing():
        try:
            return fn()
        except TransportUnavailable as exc:
            logger.warning("broker unavailable at start-up, retrying: %s", exc)
            stop.wait(1.0)
    return None
