"""Processes: the consumer: receives messages, hands them to idle pool slots, acks outcomes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError
from django.db import connection as db_connection
from django.utils import timezone
from kombu.asynchronous import Hub
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.messaging import Consumer as KombuConsumer

from .. import broker, client, conf, execute, message, registry, signals, workflow
from ..exceptions import TaskNotRegistered, TimeLimitExceeded, WorkerLostError
from ..models import TaskResult, TaskState
from ..outage import Outage
from ..transport import amqp
from .parking import PARK_AFTER, PARK_BATCH, PARK_COLLECT, Parking
from .pool import LOST, QUEUE_BEHIND_UNDER, Job, Pool
from .ratelimit import RateLimits
from .state import Tally, Watcher
from .writer import ResultWriter

if TYPE_CHECKING:
    from .events import Events

logger = logging.getLogger("django_tasks_q.worker")

RECONNECT_MAX_INTERVAL = 5.0
REVOKED_REFRESH = 1.0  # seconds between reads of newly revoked ids
RELEASE_INTERVAL = 1.0  # seconds between looks for parked messages that are due
ACK, REQUEUE, DROP = "ack", "requeue", "drop"  # how a message is settled
REQUEUE_DELAY = 2.0  # seconds before a message whose outcome could not be stored goes back
DELIVERIES_HEADER = "x-deliveries"  # how many times a pool child died running this message
ACK_DELAY = 0.010  # seconds an acknowledgement may wait to be sent with others (_ack_soon)
ACK_BATCH = 128  # acknowledgements sent at once without waiting for ACK_DELAY
#: Prefetch slots added while tasks finish in under ``QUEUE_BEHIND_UNDER``: room for those
#: waiting behind another in a pool child, for those waiting for their acknowledgement or their
#: success row (``results="all"``), and for fetches that bring many at once, so that the pool
#: never waits for the broker between such tasks. Long tasks do not need it, and would only be
#: prefetched away from other workers into it. On RabbitMQ, where finished tasks hold their
#: slots until acknowledged, half the window makes a batch: of rows being written, while the
#: next gathers in the other half.
SHORT_ROOM = 128
SHORT_ROOM_CHECK = 1.0  # seconds without a short task before the room is taken back
FETCH_DELAY = 0.010  # seconds a fetch of a few messages may wait for more room (_defer_fetch)
POLL_MOST = 1000  # messages one poll of django:// (or memory://) may take
WATCHDOG_INTERVAL = 10.0  # seconds between looks for a consumer that receives nothing
WATCHDOG_STRIKES = 2  # looks in a row that find work waiting and nothing received
KEEP_TERMINATED = 1000  # ids of tasks killed on revoke that a later revoke can be told of


class Consumer:
    """Owns the broker connection; feeds the pool with at most ``prefetch`` unacked messages."""

    def __init__(self, queues: list[str], pool: Pool, hostname: str, prefetch: int,
                 time_limit: float | None = None, soft_time_limit: float | None = None,
                 watchdog_interval: float = WATCHDOG_INTERVAL) -> None:
        self.queues = queues
        self.watchdog_interval = watchdog_interval
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.pool = pool
        self.hostname = hostname
        self.prefetch = prefetch
        self.buffer: deque[Job] = deque()
        self._fetch_after = 0.0  # monotonic time a fetch put off by _defer_fetch is made
        self.delayed: list[tuple[float, int, Job]] = []  # (due, seq, job), due in time.time()
        self._to_park: list[Job] = []  # due much later: parked together, shortly
        self._qos_global = False
        self._seq = itertools.count()
        self.stopping = False  # warm shutdown: take nothing new
        self.cold = False
        self.stop_deadline: float | None = None  # monotonic time the warm shutdown turns cold
        self.hub: Any = None
        self.kombu: KombuConsumer | None = None
        self.connection: Any = None
        self.on_ready: Callable[[], None] | None = None
        #: Called with the new event loop on every (re)connect, before the watchers are.
        self.on_connect: list[Callable[[Any], None]] = []
        self._polled = False
        self._channel: Any = None  # the consuming channel, kept through a warm shutdown
        self._connected = False
        self._orphans: list[tuple[Job, str]] = []  # (job, how) received on a lost connection
        self._acking: list[_Finished] = []  # acknowledged together shortly (_ack_soon)
        self._writer = ResultWriter(hostname, self._written)  # their success rows, first
        self._short_room = 0  # SHORT_ROOM while tasks are short
        self._short_seen = False  # one finished since the last _check_short_room
        self._acks_sent: list[Job] = []  # their acknowledgements were sent, maybe not applied
        # AMQP: the channel's delivered and unsettled messages by tag, oldest first; and those
        # finished since the last acknowledgement, acknowledged together (_ack_due).
        self._unsettled: dict[int, Job] | None = None
        self._acks_due: list[Job] = []
        self._ack_timer: Any = None  # when _ack_due runs unless they fill half the window first
        self._unreachable = False
        self._received = False  # a message arrived since the watchdog last looked
        self._strikes = 0
        self._stalled = False
        self._database = Outage(logger, "The database is reachable again")
        self.revoked: set[str] = set()
        self._terminated: dict[str, None] = {}  # ids killed on revoke, oldest first
        self.rate_limits = RateLimits()
        self.parking = Parking(hostname)
        self.tally = Tally()
        #: Told of every task's way through (stats, heartbeats, events); see worker/state.py.
        self.watchers: list[Watcher] = [self.tally]
        #: Celery-compatible events (worker/events.py), among the watchers when set.
        self.events: Events | None = None
        self._revoked_since: datetime | None = None
        self._revoked_read = float("-inf")  # when revoked ids were last read (monotonic)
        pool.on_done = self.on_done
        pool.on_slot = self._dispatch
        pool.on_return = self._returned

    # -- connection life ---------------------------------------------------------------------
    def run(self, wakeup_fd: int | None = None,
            on_wakeup: Callable[[], None] | None = None) -> None:
        """Consume until a warm shutdown has drained the pool, or a cold one is asked for."""
        try:
            self._run(wakeup_fd, on_wakeup)
        finally:
            self._writer.stop()

    def _run(self, wakeup_fd: int | None, on_wakeup: Callable[[], None] | None) -> None:
        attempt = 0
        while not (self.cold or self.stopping):
            conn = broker.connection()
            try:
                conn.ensure_connection(errback=self._connect_failed, max_retries=None,
                                       interval_start=0.5, interval_step=1,
                                       interval_max=RECONNECT_MAX_INTERVAL,
                                       callback=self._check_cold)
            except _ColdStop:
                return
            if attempt or self._unreachable:
                logger.warning("Reconnected to %s", broker.safe_url())
            self._unreachable = False
            attempt += 1
            try:
                self._consume(conn, wakeup_fd, on_wakeup)
                return
            except conn.connection_errors + conn.channel_errors as exc:
                logger.warning("Lost the connection to %s (%s: %s); reconnecting",
                               broker.safe_url(), type(exc).__name__, exc)
                self._unreachable = True  # announced: the retries stay quiet
                self._forget_unacked()
            except _Stalled:
                self._forget_unacked()
            finally:
                if self.hub is not None:
                    # Closing runs callbacks kombu still had queued; on a dead connection they
                    # raise its errors, which only say what is known already.
                    with contextlib.suppress(*conn.connection_errors, *conn.channel_errors):
                        self.hub.close()
                    self.hub = None
                with contextlib.suppress(Exception):
                    conn.release()

    def _connect_failed(self, exc: Exception, interval: float) -> None:
        # One line per outage; the retries in between are only of interest when debugging.
        level = logging.DEBUG if self._unreachable else logging.WARNING
        logger.log(level, "Cannot reach %s (%s: %s); retrying until it is back",
                   broker.safe_url(), type(exc).__name__, exc)
        self._unreachable = True

    def _check_cold(self) -> None:
        # Called between connection attempts: any shutdown request ends the waiting.
        if self.cold or self.stopping:
            raise _ColdStop

    def _consume(self, conn: Any, wakeup_fd: int | None,
                 on_wakeup: Callable[[], None] | None) -> None:
        self.connection = conn
        hub = self.hub = Hub()
        self.pool.register(hub)
        self._writer.register(hub)
        if wakeup_fd is not None and on_wakeup is not None:
            hub.add_reader(wakeup_fd, on_wakeup)
        self.kombu = KombuConsumer(conn.channel(), queues=broker.declare(conn, self.queues).queues,
                                   on_message=self.on_message,
                                   accept=list(conf.get().ACCEPT_CONTENT))
        self._unsettled = {} if conn.transport.driver_type == "amqp" else None
        # RabbitMQ applies a per-consumer limit only to consumers created after it, and makes
        # one consumer per queue; a limit for the channel covers all queues and can be widened
        # later (messages held until due, or waiting to be parked).
        self._qos_global = not conn.qos_semantics_matches_spec
        self._set_prefetch()
        self._polled = not conn.transport.implements.asynchronous
        # A polled transport may watch a socket as well (django:// on PostgreSQL: LISTEN).
        conn.transport.register_with_event_loop(conn.connection, hub)
        if self._polled:
            hub.call_repeatedly(conn.transport.polling_interval or 0.1, self._poll)
        hub.propagate_errors = conn.connection_errors + conn.channel_errors
        if time.monotonic() - self._revoked_read >= REVOKED_REFRESH:  # see read_revoked()
            self._refresh_revoked()
        for hook in self.on_connect:
            hook(hub)
        for watcher in self.watchers:  # before the first delivery, which they are told of
            watcher.attach(hub, conn)
        self.kombu.consume()
        if self.on_ready is not None:
            self.on_ready()
            self.on_ready = None
        hub.call_repeatedly(REVOKED_REFRESH, self._refresh_revoked)
        hub.call_repeatedly(RELEASE_INTERVAL, self._release_parked)
        hub.call_repeatedly(SHORT_ROOM_CHECK, self._check_short_room)
        self._received, self._strikes, self._stalled = False, 0, False
        hub.call_repeatedly(self.watchdog_interval, self._watchdog)
        self._channel = self.kombu.channel
        if hasattr(self._channel, "defer_fetch"):
            self._channel.defer_fetch = self._defer_fetch
        self._connected = True
        self._flush_acks()  # left from the connection before, if any
        self._settle_orphans()
        timeout = conn.transport_options.get("visibility_timeout")
        if conn.transport.driver_type == "redis" and timeout:
            hub.call_repeatedly(max(1.0, float(timeout) / 4), self._keep_leases)
        elif hasattr(self._channel, "renew_leases"):
            # django:// renews while it polls; this keeps it up when polls stop (shutdown).
            hub.call_repeatedly(1.0, self._channel.renew_leases)
        loop = hub.create_loop()
        while not self.cold:
            if self._stalled:
                raise _Stalled
            if self.stopping:
                self._begin_shutdown()
                if not self.pool.active():
                    self._flush_acks(confirm=True)
                    return
                if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
                    logger.warning("Shutdown grace period is over: giving %d running task(s) "
                                   "back to the broker", len(self.pool.active()))
                    self.cold = True
                    break
            next(loop)
        # Cold shutdown: hand back what is still running while the connection is open.
        self._flush_acks(confirm=True)
        self._begin_shutdown()
        for job in self.pool.active():
            self._settle(job, REQUEUE)

    def _waiting(self) -> list[Job]:
        """Received and not started: in the buffer, to be parked, or held until due."""
        return [*self.buffer, *self._to_park, *(entry[2] for entry in self.delayed)]

    def _give_back_waiting(self) -> None:
        for job in self._waiting():
            self._settle(job, REQUEUE)
        self.buffer.clear()
        self._to_park.clear()
        self.delayed.clear()

    def _held(self) -> list[Job]:
        return [*self._waiting(), *self.pool.active()]

    def _keep_leases(self) -> None:
        # Redis gives an unacked message to another worker once its delivery time is older
        # than the visibility timeout; moving that time forward for every message this worker
        # still holds means only a dead worker's messages are delivered again.
        tags = {str(job.message.delivery_tag): time.time() for job in self._held()
                if not job.stale and not job.settled and job.message is not None}
        if tags:
            # Not on the channel's own client: its connection may be waiting in BRPOP, and a
            # command sent there is answered (and the lease moved) only once that returns.
            with self._channel.conn_or_acquire() as client:
                client.zadd(self._channel.unacked_index_key, tags, xx=True)

    def _watchdog(self) -> None:
        """Reconnect when the connection is up but nothing arrives while our queues have work.

        A consumer can be lost without the connection failing (a cancelled subscription, a
        half-open socket); the worker would then sit idle forever. Only an idle worker looks:
        one with a free pool slot and nothing waiting, that received nothing since last time.
        """
        received, self._received = self._received, False
        if received or self.stopping or self.buffer or not self.pool.free():
            self._strikes = 0
            return
        try:
            waiting = self._ready_in_queues()
        except Exception as exc:  # noqa: BLE001 - a broken channel: reconnecting is the cure
            waiting, reason = -1, f"{type(exc).__name__}: {exc}"
        else:
            reason = f"{waiting} message(s) wait in {','.join(self.queues)}"
        if waiting == 0:
            self._strikes = 0
            return
        self._strikes += 1
        if self._strikes >= WATCHDOG_STRIKES:
            logger.warning("Received nothing for %.0fs while %s: reconnecting to %s",
                           self._strikes * self.watchdog_interval, reason, broker.safe_url())
            self._stalled = True

    def _ready_in_queues(self) -> int:
        """Messages ready for delivery in the queues consumed (not those delivered already)."""
        return sum(broker.queue_size(self._channel, name) for name in self.queues)

    def _poll(self) -> None:
        # Transports without an event-loop integration (django://, memory://) are polled. The
        # prefetch window bounds what is taken (it widens while messages wait to be parked);
        # POLL_MOST only keeps one poll from holding up the event loop for long.
        for _ in range(POLL_MOST):
            if self.stopping or self.kombu is None:
                return
            full = len(self.buffer) >= self.prefetch
            try:
                # Even when full: the prefetch limit holds task messages back, and remote
                # control (a channel of its own) is still answered.
                self.connection.drain_events(timeout=0)
            except TimeoutError:
                return
            if full:
                return

    def _begin_shutdown(self) -> None:
        if self.kombu is not None:
            with contextlib.suppress(Exception):
                self.kombu.cancel()
            self.kombu = None
            for watcher in self.watchers:
                watcher.stopping()
            self._park_batch()  # their eta is far: park them rather than hand them around
            # Received but not started: give them back now rather than at connection close.
            self._give_back_waiting()

    def _forget_unacked(self) -> None:
        # Their channel died with the connection. RabbitMQ redelivers them by itself; on Redis
        # and django:// they stay set aside until settled by tag from the next connection.
        self._connected = False
        # Acknowledged here, not yet in the broker: stored and then acknowledged by tag once
        # connected again (_flush_acks).
        for finished in [*self._acking, *(self._writer.writing or [])]:
            finished.job.stale = True
        # Finished this turn: RabbitMQ hands them out again with the rest of the channel's.
        for job in self._acks_due:
            job.stale = True
        self._acks_due = []
        self._ack_timer = None  # on the event loop of the connection that died
        # Sent, perhaps not applied: sent again (it is harmless twice) from the next connection.
        self._orphans.extend((job, ACK) for job in self._acks_sent)
        self._acks_sent = []
        for job in self._held():
            job.stale = True
        self._give_back_waiting()

    def _settle_orphans(self) -> None:
        """Settle, through the current channel, messages received on a connection now gone."""
        orphans, self._orphans = self._orphans, []
        qos: Any = getattr(self._channel, "qos", None)
        for job, how in orphans:
            tag = job.message.delivery_tag
            try:
                if self.connection.transport.driver_type == "redis":
                    if how == REQUEUE:
                        qos.restore_by_tag(tag, leftmost=True)
                    else:
                        qos._remove_from_indices(tag).execute()
                elif hasattr(self._channel, "renew_leases"):  # django:// tags name their row
                    if how == REQUEUE:
                        qos.reject(tag, requeue=True)
                    else:
                        qos.ack(tag)
            except Exception as exc:  # noqa: BLE001 - it comes back after its timeout anyway
                logger.warning("Could not settle message %s from the previous connection: %s",
                               _label(job), exc)

    # -- messages ----------------------------------------------------------------------------
    def on_message(self, raw: Any) -> None:
        """A message arrived: parse it, then start it, hold it until due, or drop it."""
        self._received = True
        try:
            body = broker.decode_body(raw)
            info = raw.delivery_info or {}
            msg = message.decode(raw.headers, body, queue=info.get("routing_key") or "",
                                 priority=broker.received_priority(raw))
        except (ContentDisallowed, DecodeError, message.MalformedMessage) as exc:
            mid = (raw.headers or {}).get("id") or (raw.properties or {}).get("correlation_id")
            logger.error("Dropped message %s from queue %s: %s (content type %s)", mid,
                         (raw.delivery_info or {}).get("routing_key"), exc, raw.content_type)
            self._settle(Job(None, raw), DROP)  # type: ignore[arg-type]
            return
        job = Job(msg, raw)
        if self._unsettled is not None:
            self._unsettled[raw.delivery_tag] = job
        for watcher in self.watchers:
            watcher.received(job)
        due = _due(msg)
        if due > time.time():
            if due - time.time() > PARK_AFTER:
                self._to_park.append(job)
                if len(self._to_park) >= PARK_BATCH:
                    self._park_batch()
                elif len(self._to_park) == 1:
                    # Collect what arrives meanwhile: one transaction parks them all. A wider
                    # prefetch window lets a stream of such messages fill the batch.
                    self._set_prefetch()
                    self.hub.call_later(PARK_COLLECT, self._park_batch)
                return
            self._hold(job, due)
            return
        self.buffer.append(job)
        self._dispatch()

    def _park_batch(self) -> None:
        """Move the messages due much later into the database, then ack them."""
        jobs, self._to_park = self._to_park, []
        if not jobs:
            return
        try:
            self.parking.park([job.msg for job in jobs])
        except DatabaseError as exc:
            self._database_failed(f"Could not park {len(jobs)} task(s) until their eta; "
                                  f"holding them in memory instead", exc)
            for job in jobs:
                self._hold(job, _due(job.msg), widen=False)  # widened once, below
        else:
            self._database_ok()
            self._ack_all(jobs)
        self._set_prefetch()

    def _ack_all(self, jobs: list[Job]) -> None:
        """Acknowledge ``jobs``: in one round trip where the transport can (django://)."""
        ack_many = getattr(getattr(self._channel, "qos", None), "ack_many", None)
        live = [job for job in jobs if not job.stale and not job.settled]
        if ack_many is not None and len(live) > 1:
            try:
                ack_many([job.message.delivery_tag for job in live])
            except Exception as exc:  # noqa: BLE001 - one statement: nothing was acked
                logger.debug("Acknowledging %d messages at once failed (%s); one by one",
                             len(live), exc)
            else:
                for job in live:
                    job.settled = True
        for job in jobs:
            self._settle(job, ACK)  # those not settled above

    def _ack_soon(self, job: Job, outcome: execute.Outcome) -> None:
        """Acknowledge ``job``, within ``ACK_DELAY`` seconds, together with the others finished
        meanwhile: their success rows (``results="all"``) in one statement first, then their
        acknowledgements in one round trip where the transport can (transport/acks.py, or on
        AMQP ``basic.ack`` frames that each cover many), sooner once they fill half the prefetch
        window. A worker that dies in between runs them again."""
        if outcome.runtime < QUEUE_BEHIND_UNDER:
            self._short_seen = True
            if not self._short_room:
                self._short_room = SHORT_ROOM
                self._set_prefetch()
        qos: Any = getattr(self._channel, "qos", None)
        later = hasattr(qos, "ack_later") and not job.stale and not job.settled
        if outcome.unstored is None and not later:
            if self._unsettled is not None and not job.stale:
                self._acks_due.append(job)
                if len(self._acks_due) >= self._ack_most():
                    self._ack_due()
                elif self._ack_timer is None:
                    self._ack_timer = self.hub.call_later(ACK_DELAY, self._ack_due)
                return
            self._settle(job, ACK)
            return
        if later:
            job.settled = True
            qos.ack_later(job.message.delivery_tag)
        self._acking.append(_Finished(job, outcome.unstored, later))
        # Those not acknowledged here yet hold their prefetch slots: sent before they fill half
        # the window.
        if len(self._acking) >= (ACK_BATCH if later else self._ack_most()):
            self._flush_acks()
        elif len(self._acking) == 1:
            self.hub.call_later(ACK_DELAY, self._flush_acks)

    def _ack_most(self) -> int:
        """How many finished messages may wait for their acknowledgement, holding prefetch
        slots: half the window (without those held until due)."""
        return max(1, (self.prefetch + self._short_room) // 2)

    def _ack_due(self) -> None:
        """Acknowledge on AMQP what finished since the last acknowledgement."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        due, self._acks_due = self._acks_due, []
        self._ack_finished(due)

    def _ack_finished(self, due: list[Job]) -> None:
        """Acknowledge ``due`` (finished jobs). On AMQP, those that come first among the
        channel's unsettled messages go in one ``basic.ack`` that covers them all
        (``multiple``); a message held for any other reason ends that run, so nothing is
        acknowledged that has not finished. The others are acknowledged one by one."""
        finished = set(due)
        run: list[Job] = []
        for job in (self._unsettled or {}).values():
            if job not in finished:
                break
            run.append(job)
        if len(run) > 1:
            for job in run:
                self._settled(job)
            self._acknowledge(run, lambda: amqp.ack(run[-1].message, multiple=True))
        for job in due:
            self._settle(job, ACK)  # those not in the run

    def _flush_acks(self, confirm: bool = False) -> None:
        """Store and acknowledge what ``_ack_soon`` collected; with ``confirm``, wait until the
        broker has applied every acknowledgement sent (before the connection closes).

        Success rows are written by the result writer's thread while the loop goes on; their
        batch is acknowledged once written (``_written``). What finishes meanwhile goes in the
        next batch, ``ACK_DELAY`` after that (or sooner, once it is large); with ``confirm``
        the writer is waited for, and the rest is stored here."""
        if self._acks_due:  # AMQP: not to wait for ACK_DELAY (shutdown)
            self._ack_due()
        if self._writer.busy:
            if not confirm:
                return  # the writer flushes again when it is done
            self._writer.wait()
        done, self._acking = self._acking, []
        if not (done or (confirm and self._acks_sent)):
            return
        if not confirm and any(f.unstored is not None for f in done):
            self._writer.submit(done)
            return
        self._written(done, self._writer.write(done), confirm)

    def _written(self, done: list[_Finished], error: DatabaseError | None,
                 confirm: bool = False) -> None:
        """Acknowledge ``done`` now that its success rows are stored, or give those with rows
        back when ``error`` kept them from the database."""
        if error is not None:
            stored = [f for f in done if f.unstored is not None]
            # Every time (they run again), while the outage itself is announced once.
            logger.warning("Could not store the results of %d finished task(s) (%s: %s); "
                           "giving them back", len(stored), type(error).__name__,
                           str(error).strip())
            self._database_failed("Could not store task results", error)
            self._give_back(stored)
            done = [f for f in done if f.unstored is None]
        elif any(f.unstored is not None for f in done):
            self._database_ok()
        # Those received on a connection now gone are acknowledged by tag from the next one.
        self._orphans.extend((f.job, ACK) for f in done if f.later and f.job.stale)
        sent = [f.job for f in done if f.later and not f.job.stale]
        unconfirmed = [*self._acks_sent, *sent]
        try:
            if sent:
                # Returns before Redis has answered; the answer to those before is read first.
                self._channel.qos.send_acks([job.message.delivery_tag for job in sent])
                self._acks_sent = sent
            if confirm and self._acks_sent:
                self._channel.qos.confirm_acks()
                self._acks_sent = []
        except self.connection.connection_errors + self.connection.channel_errors:
            # Not known to be applied: sent again (harmless twice) from the next connection.
            self._orphans.extend((job, ACK) for job in unconfirmed)
            self._acks_sent = []
            raise
        finally:
            self._ack_finished([f.job for f in done if not f.later])
        if self._acking and not confirm:
            # What finished while this batch was written: in the next, once it has grown.
            self.hub.call_later(ACK_DELAY, self._flush_acks)

    def _give_back(self, done: list[_Finished]) -> None:
        """Give finished jobs whose results could not be stored back to the broker, a little
        later (the database may be down): they run again."""
        for f in done:
            if f.later:  # acknowledged here already: given back by tag
                self._orphans.append((f.job, REQUEUE))
            else:
                self._requeue_later(f.job)
        if any(f.later for f in done):
            self.hub.call_later(REQUEUE_DELAY, self._settle_orphans)

    def _release_parked(self) -> None:
        try:
            released = self.parking.release_due()
        except DatabaseError as exc:
            self._database_failed("Could not release parked tasks", exc)
            return
        except Exception:  # noqa: BLE001 - the broker: the claims run out, they go next time
            logger.exception("Could not publish parked tasks")
            return
        self._database_ok()
        if released:
            logger.info("Released %d parked task(s) that are due", released)

    def _hold(self, job: Job, due: float, widen: bool = True) -> None:
        """Keep ``job`` (unacknowledged) until ``due`` (a ``time.time()``), then dispatch it."""
        heapq.heappush(self.delayed, (due, next(self._seq), job))
        # A held message must not use up a prefetch slot, or held ones could starve the pool.
        if widen:
            self._set_prefetch()
        self.hub.call_later(max(0.0, due - time.time()), self._release_due)

    def _window(self) -> int:
        """Unacknowledged messages to allow: the prefetch, plus room for those waiting to be
        parked or held until due, which would otherwise starve the pool, and, while tasks are
        short, ``SHORT_ROOM``."""
        return (self.prefetch + len(self.delayed) + (PARK_BATCH if self._to_park else 0)
                + self._short_room)

    def _check_short_room(self) -> None:
        """Take the room for short tasks back once none has finished for a while (one change
        of the window a second at most: RabbitMQ answers each)."""
        if self._short_room and not self._short_seen:
            self._short_room = 0
            self._set_prefetch()
        self._short_seen = False

    def _set_prefetch(self) -> None:
        if self.kombu is not None:
            with contextlib.suppress(Exception):
                self.kombu.qos(prefetch_count=self._window(), apply_global=self._qos_global)

    def _release_due(self) -> None:
        now = time.time()
        released = False
        while self.delayed and self.delayed[0][0] <= now:
            self.buffer.append(heapq.heappop(self.delayed)[2])
            released = True
        if released:
            self._set_prefetch()
            self._dispatch()

    def read_revoked(self) -> None:
        """Read the revoked task ids before the worker forks its pool, on the database
        connection its start-up checks opened: the first connection to the broker need not
        wait for a new one (the pool closes it), and the ids are read again every second."""
        self._refresh_revoked(running=False)

    def _refresh_revoked(self, running: bool = True) -> None:
        # Revocations are rows in the result store; reading the new ones once a second keeps
        # the per-message path free of database queries.
        now = timezone.now()
        since = self._revoked_since or now - conf.get().RESULT_EXPIRES
        try:
            rows = list(TaskResult.objects.filter(status=TaskState.REVOKED, date_done__gte=since
                                                  ).values_list("task_id", "result")[:100_000])
        except DatabaseError as exc:
            self._database_failed("Could not read revoked tasks", exc)
            return
        self._database_ok()
        self._revoked_read = time.monotonic()
        # Overlap the windows: a row committed late with an earlier timestamp is still seen.
        self._revoked_since = now - timedelta(seconds=5)
        self.revoke({task_id for task_id, _ in rows})
        if running:  # else nothing runs yet: none of them will start
            self.revoke({task_id for task_id, result in rows
                         if isinstance(result, dict) and result.get("terminate")},
                        terminate=True)

    def revoke(self, task_ids: set[str], terminate: bool = False) -> list[str]:
        """Run none of ``task_ids`` from now on; with ``terminate``, kill those running now.
        Returns the ids of those terminated (now, or already by an earlier revocation)."""
        self.revoked.update(task_ids)
        if not (terminate and task_ids):
            return []
        for job in self.pool.active():
            if job.msg.id in task_ids and not job.revoked:
                job.revoked = True
                self.pool.terminate(job)
                self._terminated[job.msg.id] = None
                while len(self._terminated) > KEEP_TERMINATED:
                    del self._terminated[next(iter(self._terminated))]
        # Whichever way the revocation arrived first (the result store, or remote control),
        # the reply names the tasks this worker stopped for it.
        return [task_id for task_id in task_ids if task_id in self._terminated]

    def _database_failed(self, what: str, exc: Exception) -> None:
        with contextlib.suppress(Exception):
            db_connection.close()  # the next use reconnects
        self._database.failed("%s: %s: %s (the worker goes on and retries)", what,
                              type(exc).__name__, str(exc).strip())

    def _database_ok(self) -> None:
        self._database.ok()

    @staticmethod
    def _acks_late(name: str) -> bool:
        try:
            option = registry.get(name).acks_late
        except TaskNotRegistered:
            return True
        return conf.get().ACKS_LATE if option is None else option

    def _with_limits(self, msg: message.TaskMessage) -> message.TaskMessage | None:
        # The task's own limits travel in the message; the worker's and the settings fill in
        # (on a copy: a retry republishes the message as it came).
        cfg = conf.get()
        hard = msg.time_limit if msg.time_limit is not None else (
            self.time_limit or cfg.TIME_LIMIT)
        soft = msg.soft_time_limit if msg.soft_time_limit is not None else (
            self.soft_time_limit or cfg.SOFT_TIME_LIMIT)
        if (hard, soft) == (msg.time_limit, msg.soft_time_limit):
            return None
        return dataclasses.replace(msg, time_limit=hard, soft_time_limit=soft)

    def _dispatch(self) -> None:
        pool, buffer, revoked = self.pool, self.buffer, self.revoked
        while buffer and pool.takes(buffer[0]):
            job = buffer.popleft()
            if job.msg.id in revoked:
                logger.info("Task %s[%s] was revoked; not run", job.msg.name, job.msg.id)
                self._announce_revoked(job, terminated=False)
                if self._ended_here(job, execute.Outcome(TaskState.REVOKED)):
                    self._settle(job, ACK)
                continue
            wait = self.rate_limits.wait(job.msg.name)
            if wait:
                self._hold(job, time.time() + wait)
                continue
            job.run = self._with_limits(job.msg)
            if not self._acks_late(job.msg.name):
                # At-most-once by request: acknowledged before it runs, never delivered again.
                self._settle(job, ACK)
            for watcher in self.watchers:
                watcher.started(job)
            pool.submit(job)

    def _defer_fetch(self, free: int) -> bool:
        """Whether a fetch of only ``free`` messages waits: while received work waits for the
        pool, the transport fetches once more room is free, for up to ``FETCH_DELAY`` seconds,
        so that one round trip brings several messages."""
        now = time.monotonic()
        if self.buffer and not self._fetch_after:
            self._fetch_after = now + FETCH_DELAY
            self.hub.call_later(FETCH_DELAY, lambda: None)  # the loop looks again by then
        if self.buffer and now < self._fetch_after:
            return True
        self._fetch_after = 0.0
        return False

    def _returned(self, job: Job) -> None:
        """The pool took ``job`` but never started it (its child went away): it goes first
        again, or back to the broker when the worker is stopping."""
        if self.stopping:
            self._settle(job, REQUEUE)
        else:
            self.buffer.appendleft(job)

    # -- outcomes ----------------------------------------------------------------------------
    def on_done(self, job: Job, outcome: execute.Outcome) -> None:
        """A job finished: start the next one, then settle its message (ack, retry, requeue)."""
        msg, status = job.msg, outcome.status
        for watcher in self.watchers:
            watcher.finished(job, outcome)
        if not self.stopping:
            # The free slot gets work before the broker round trips below, not after them.
            self._dispatch()
        if status == TaskState.RETRY:
            headers = {k: v for k, v in msg.headers.items() if k != DELIVERIES_HEADER}
            self._republish(job, dataclasses.replace(
                msg, retries=msg.retries + 1, headers=headers,
                eta=datetime.fromisoformat(outcome.retry_eta) if outcome.retry_eta else None))
        elif status == execute.REQUEUE:
            self._requeue_later(job)
        elif status == LOST:
            self._on_lost(job, outcome)
        elif self._publish_follow(job, outcome.follow):
            self._ack_soon(job, outcome)
            if status == TaskState.SUCCESS and logger.isEnabledFor(logging.INFO):
                logger.info("Task %s[%s] succeeded in %.3fs: %s", msg.name, msg.id,
                            outcome.runtime, outcome.result_repr)
        if self._polled and not self.stopping and not self.buffer and self.hub is not None:
            self.hub.call_soon(self._poll)

    def _publish_follow(self, job: Job, follow: list[client.Outgoing]) -> bool:
        """Publish what follows ``job`` in its workflow before its message is acknowledged;
        False (the message is given back and run again) when that fails."""
        try:
            for msg, body in follow:
                client.publish(msg, body, defer=False)
        except Exception:  # noqa: BLE001 - run it again rather than lose its workflow
            logger.exception("Could not publish what follows %s; giving it back", _label(job))
            self._requeue_later(job)
            return False
        return True

    def _ended_here(self, job: Job, outcome: execute.Outcome) -> bool:
        """``job`` ended in this process, not in the pool (revoked, or its child lost): work
        out and publish what follows it; False when that failed (it was given back)."""
        if not workflow.in_workflow(job.msg):
            return True
        try:
            follow = workflow.follow_ups(job.msg, outcome)
        except DatabaseError as exc:
            self._database_failed(f"Could not record the end of {_label(job)} in its "
                                  f"workflow; giving it back", exc)
            self._requeue_later(job)
            return False
        return self._publish_follow(job, follow)

    def _on_lost(self, job: Job, outcome: execute.Outcome) -> None:
        if job.revoked:  # terminated on request: the REVOKED row is there already
            self._announce_revoked(job, terminated=True)
            if self._ended_here(job, execute.Outcome(TaskState.REVOKED, error="terminated")):
                self._settle(job, ACK)
            return
        if job.timed_out:
            self._fail(job, TimeLimitExceeded(
                f"hard time limit ({job.timed_out:g}s) exceeded; the pool child running "
                f"it was killed and replaced"))
            return
        deliveries = int(job.msg.headers.get(DELIVERIES_HEADER) or 1)
        limit = conf.get().MAX_DELIVERIES
        if deliveries >= limit:
            self._fail(job, WorkerLostError(
                f"{outcome.error}; the task's process died on each of its {deliveries} "
                f"deliveries (MAX_DELIVERIES = {limit}), so it is not delivered again"))
            return
        # The count travels in the message itself, the same way on every broker.
        self._republish(job, dataclasses.replace(
            job.msg, headers={**job.msg.headers, DELIVERIES_HEADER: deliveries + 1}))

    def _republish(self, job: Job, msg: message.TaskMessage) -> None:
        """Publish ``msg`` in place of ``job``'s message, then ack; requeue if it fails."""
        try:
            client.publish(msg)
        except Exception:  # noqa: BLE001 - keep the original rather than lose the task
            logger.exception("Could not publish %s[%s] again; requeueing it", msg.name, msg.id)
            self._settle(job, REQUEUE)
        else:
            self._settle(job, ACK)

    def _fail(self, job: Job, exc: Exception) -> None:
        # The task could not report its own failure: the parent stores it, then acks.
        try:
            execute.store(job.msg, TaskState.FAILURE, result=execute.exception_info(exc),
                          worker=self.hostname)
        except DatabaseError as error:
            # Unacknowledged, the message comes back: the outcome is not lost.
            self._database_failed(f"Could not store the failure of {job.msg.name}"
                                  f"[{job.msg.id}]; giving it back", error)
            self._requeue_later(job)
            return
        logger.error("Task %s[%s] failed: %s: %s", job.msg.name, job.msg.id,
                     type(exc).__name__, exc)
        signals.task_failure.send(sender=registry.find(job.msg.name), task_id=job.msg.id,
                                  exception=exc, args=job.msg.args, kwargs=job.msg.kwargs,
                                  traceback="", einfo="")
        if self._ended_here(job, execute.Outcome(TaskState.FAILURE, exc=exc)):
            self._settle(job, ACK)

    def _announce_revoked(self, job: Job, terminated: bool) -> None:
        """Tell ``task_revoked`` receivers and the watchers that ``job`` was dropped or killed."""
        # A terminated task's prefork child was killed with SIGKILL (pool.terminate).
        signals.task_revoked.send(sender=registry.find(job.msg.name),
                                  request=execute.request_for(job.msg, self.hostname),
                                  terminated=terminated,
                                  signum=signal.SIGKILL if terminated else None, expired=False)
        for watcher in self.watchers:
            watcher.revoked(job, terminated=terminated)

    def _requeue_later(self, job: Job) -> None:
        # Not at once: when the database is down, an instant requeue only spins; meanwhile
        # the message stays unacknowledged, so nothing is lost.
        self.hub.call_later(REQUEUE_DELAY, self._settle, job, REQUEUE)

    def _settle(self, job: Job, how: str) -> None:
        """Acknowledge (``ACK``), give back (``REQUEUE``) or drop (``DROP``) job's message."""
        if job.settled:
            return
        self._settled(job)
        if job.stale:
            self._orphans.append((job, how))
            if self._connected:
                self._settle_orphans()
            return
        if how != ACK:
            send = functools.partial(job.message.reject, requeue=how == REQUEUE)
        elif self._unsettled is not None:  # AMQP
            send = functools.partial(amqp.ack, job.message)
        else:
            send = job.message.ack
        self._acknowledge([job], send, how)

    def _settled(self, job: Job) -> None:
        job.settled = True
        if self._unsettled is not None and self._unsettled.get(job.message.delivery_tag) is job:
            del self._unsettled[job.message.delivery_tag]

    def _acknowledge(self, jobs: list[Job], send: Callable[[], Any], how: str = ACK) -> None:
        """``send()`` the broker what settles ``jobs`` (marked settled already)."""
        try:
            send()
        except self.connection.connection_errors + self.connection.channel_errors:
            # The connection died under the ack: settle them by tag once reconnected, or the
            # broker would hand them out again after their visibility timeout.
            for job in jobs:
                job.stale = True
                self._orphans.append((job, how))
            raise
        except Exception:  # noqa: BLE001 - e.g. already acknowledged
            logger.exception("Could not settle message %s", ", ".join(map(_label, jobs)))


@dataclasses.dataclass(eq=False)
class _Finished:
    """A job that ended well, waiting to be acknowledged with others (``_ack_soon``)."""

    job: Job
    unstored: tuple[str, datetime] | None  # its success row, to write first (execute.Outcome)
    later: bool  # acknowledged here already: the broker is told by tag

    @property
    def msg(self) -> message.TaskMessage:
        return self.job.msg


def _label(job: Job) -> str:
    """``name[id]`` of ``job``'s task for log lines; ``?`` for a message that was not read."""
    return f"{job.msg.name}[{job.msg.id}]" if job.msg else "?"


def _due(msg: message.TaskMessage) -> float:
    """When ``msg`` may start, as a ``time.time()``; 0 for at once."""
    return msg.eta.timestamp() if msg.eta is not None else 0.0


class _ColdStop(Exception):
    pass


class _Stalled(Exception):
    """The watchdog found the consumer receiving nothing while its queues have work."""
