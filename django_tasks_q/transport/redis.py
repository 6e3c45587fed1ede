"""Adapters: Redis, where a message leaves its queue and is recorded as unacked in one step.

kombu's Redis transport takes a message with ``BRPOP`` and records it as unacknowledged in a
second command. A worker killed between the two loses the message: it is in no list any more
and in no unacked table, so nothing ever delivers it again. Under load that window is wide, as
the reply waits in the socket while the worker is busy with other messages.

Here a message is taken by a script that pops it and records it in the same atomic step, in
kombu's own unacked layout (so kombu's and Celery's restore, acknowledge and reject work on it
unchanged). Several are taken per round trip, up to the free prefetch; while the worker has
received work waiting for its pool, a fetch of less than half the window waits a little for more
room. Only when every queue is empty does the channel block in ``BRPOP`` to wait for the next
message; one that arrives then is recorded as kombu records it, in commands written before it is
handed over, without waiting for Redis's answer: once its task has started, a worker killed at
any moment cannot lose it.
Acknowledgements are sent in batches, the same way; the answers are read with the next batch
(``QoS``).

Publishing writes kombu's message envelope, key for key, in one ``LPUSH`` on a connection the
channel holds for it (kombu builds two clients per publish and goes through its producer's
serializer, compression and retry machinery each time). A publish that waits returns once Redis
has answered; ``.delay()`` returns once the command is written, and Redis's answers are read
together later (at the end of the request or task, or every few thousand publishes), as
RabbitMQ's confirms are. What a lost connection had not answered is pushed again.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from queue import Empty
from socket import IPPROTO_TCP, MSG_DONTWAIT
from time import monotonic, time
from typing import Any, NamedTuple

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis-py before 8
    DriverInfo = None  # type: ignore[assignment,misc]
from redis.exceptions import NoScriptError, ResponseError

from ..message import CONTENT_ENCODING, CONTENT_TYPE, new_id, to_json
from . import wirejson
from .acks import BatchedAcks
from .base import RedisChannel, RedisQoS

logger = logging.getLogger(__name__)

#: ``socket.TCP_INFO`` (Linux), and the state a connection is in until either end closes it.
TCP_INFO = getattr(socket, "TCP_INFO", None)
TCP_ESTABLISHED = 1
#: The most messages one round trip takes (the free prefetch bounds it too).
POP_LIMIT = 100
#: How long a publish that follows another polls for Redis's reply before it blocks on the
#: socket instead.
SPIN_SECONDS = 0.0005
#: A publish "follows another" when it starts within this long of the previous one's end.
BURST_SECONDS = 0.001
#: How many bytes of answers one read takes (an answer is ``:<length>\r\n``, about 8 bytes).
REPLY_BUFFER = 4096

# KEYS: the unacked index, the unacked table, then the queue keys in the order they are served.
# ARGV: the delivery time, the most messages to take.
# Returns index of the queue key (1-based), message, recorded (1/0) for each message taken.
# Keys found empty stay empty while the script runs: each is popped until empty, in order.
POP_SCRIPT = """
local taken = {}
local limit = tonumber(ARGV[2])
local count = 0
for i = 3, #KEYS do
  while count < limit do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local recorded = 0
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag = message.properties.delivery_tag
      local info = message.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table' then
        redis.call('ZADD', KEYS[1], ARGV[1], tag)
        redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info.exchange) ..
                   ',' .. cjson.encode(info.routing_key) .. ']')
        recorded = 1
      end
    end
    count = count + 1
    taken[#taken + 1] = i - 2
    taken[#taken + 1] = item
    taken[#taken + 1] = recorded
  end
end
return taken
"""


class Pushed(NamedTuple):
    """An ``LPUSH`` whose answer has not been read: pushed again if its connection is lost."""

    key: bytes
    payload: bytes
    task_id: str | None


class Refused(Exception):
    """Redis answered ``LPUSH``es with errors: those messages are not in Redis. ``refused``
    holds (task id, Redis's error) for each."""

    def __init__(self, refused: list[tuple[str | None, str]]) -> None:
        super().__init__(refused[0][1])
        self.refused = refused


def resp(*args: str | bytes) -> bytes:
    """One command in Redis's protocol, as redis-py packs it."""
    parts = [arg.encode() if isinstance(arg, str) else arg for arg in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(part), part)
                                             for part in parts)


def closed_by_server(sock: Any) -> bool:
    """Whether the server has closed or reset TCP socket ``sock`` (Linux); False where that
    cannot be told (a Unix socket, another system)."""
    if TCP_INFO is None or sock is None:
        return False
    try:
        state: int = sock.getsockopt(IPPROTO_TCP, TCP_INFO, 1)[0]
    except OSError:  # not TCP
        return False
    return state != TCP_ESTABLISHED


def _recv_now(sock: Any) -> bytes | None:
    """What ``sock`` holds (``b""`` once the server closed it), or None if nothing has arrived:
    never blocks."""
    timeout = sock.gettimeout()
    try:
        if timeout is None:  # a blocking socket: one call, no change of mode
            return sock.recv(REPLY_BUFFER, MSG_DONTWAIT)  # type: ignore[no-any-return]
        sock.settimeout(0.0)
        try:
            return sock.recv(REPLY_BUFFER)  # type: ignore[no-any-return]
        finally:
            sock.settimeout(timeout)
    except BlockingIOError:
        return None


class QoS(BatchedAcks, RedisQoS):
    """kombu's, except that a message the pop script recorded is not written again, one taken
    by ``BRPOP`` is recorded without waiting for Redis, and acknowledgements can be sent
    together (``BatchedAcks``). Both writes go on a connection held for them, and their replies
    are read on the next acknowledgement (when they are there already) or by
    ``confirm_acks``. kombu's own ``ack`` and ``reject``, which go through another connection,
    wait for those writes first, so that they find the record."""

    channel: Channel

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        recorded = channel.recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
        else:
            # Taken by BRPOP: kombu's unacked record (``ZADD`` and ``HSET``) is written before
            # the consumer's callback hands the task to the pool. Written, it reaches Redis even
            # if this process is killed the next moment; written after the hand-over, it could
            # be lost with a worker killed while the task ran, and the message with it.
            try:
                self._send(self._record(message, delivery_tag))
            except channel.connection_errors as exc:
                # BRPOP took it off its queue already: running it beats dropping it.
                logger.warning("Could not record message %s as unacknowledged (%s): its task "
                               "runs, but is lost if this worker dies before it ends",
                               delivery_tag, exc)
        virtual.QoS.append(self, message, delivery_tag)

    def _record(self, message: Any, delivery_tag: str) -> list[bytes]:
        """The ``ZADD`` and ``HSET`` of kombu's unacked record of ``message``, packed. The
        record holds the message as Redis gave it to ``BRPOP``, as the pop script's does."""
        channel, info = self.channel, message.delivery_info
        prefix = channel.global_keyprefix or ""
        taken = channel.taken  # set only while _brpop_read delivers the message
        if taken is None:  # not from BRPOP (a test, or kombu's own delivery)
            taken = dumps(message._raw).encode()
        # Names are plain strings: the standard encoder, which kombu's would call, does.
        entry = b"[%b,%b,%b]" % (taken, json.dumps(info["exchange"]).encode(),
                                 json.dumps(info["routing_key"]).encode())
        return [resp("ZADD", prefix + self.unacked_index_key, b"%r" % time(), delivery_tag),
                resp("HSET", prefix + self.unacked_key, delivery_tag, entry)]

    def ack(self, delivery_tag: str) -> None:
        self.confirm_acks()
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.confirm_acks()  # a requeue reads the message back from its record
        super().reject(delivery_tag, requeue)

    def send_acks(self, delivery_tags: list[str]) -> None:
        """``ZREM`` and ``HDEL`` the tags from kombu's unacked index and table. Both commands
        can be sent again."""
        prefix = self.channel.global_keyprefix or ""
        self._send([resp("ZREM", prefix + self.unacked_index_key, *delivery_tags),
                    resp("HDEL", prefix + self.unacked_key, *delivery_tags)], confirm=True)

    def _send(self, commands: list[bytes], confirm: bool = False) -> None:
        """Send ``commands`` (packed by ``resp``) without waiting for their replies; with
        ``confirm``, read those of the commands sent before first (raising if one failed)."""
        channel = self.channel
        if confirm:
            self.confirm_acks()
        try:
            conn = self._conn()
            conn.send_packed_command(commands, check_health=False)
            channel._ack_replies += len(commands)
        except BaseException:
            channel._drop_ack_conn()
            raise

    def _conn(self) -> Any:
        """The connection records and acknowledgements go on: the one held, unless Redis has
        closed it (its ``timeout`` closes a connection idle that long, ``CLIENT KILL`` any),
        as the first command written to a closed connection is lost without an error."""
        channel = self.channel
        conn = channel._ack_conn
        if conn is not None and closed_by_server(conn._sock):
            with suppress(channel.connection_errors):
                self.confirm_acks()  # what Redis answered before it closed the connection
            channel._drop_ack_conn()
            conn = None
        if conn is None:
            conn = channel._ack_conn = channel.own_connection()
        return conn

    def confirm_acks(self) -> None:
        channel = self.channel
        try:
            while channel._ack_replies:
                channel._ack_replies -= 1
                channel._ack_conn.read_response()
        except BaseException:
            channel._drop_ack_conn()
            raise


class Channel(RedisChannel):
    """A Redis channel whose consuming pops are atomic with their unacked record."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded: set[str] = set()  # tags taken by the script, not yet handed to QoS
        self._pop_sha: str | None = None
        self._popping: list[str] = []  # the queue of each key of the script in flight
        self._blocking = False  # the command in flight is a BRPOP, not the script
        self._wait_next = False  # the last script found every queue empty
        self._sync_client: Any = None  # built once, on first use (see conn_or_acquire)
        self._publish_conn: Any = None  # push's own connection
        self._published_at = float("-inf")  # when push last returned (monotonic)
        #: Pushes written but not answered yet (``push``), oldest first.
        self.unanswered: deque[Pushed] = deque()
        self._answers = bytearray()  # answers read, not yet matched with their pushes
        self._ack_conn: Any = None  # the connection QoS records and acknowledges on
        self._ack_replies = 0  # replies to those writes not read yet
        self.taken: bytes | None = None  # the message BRPOP took, as Redis gave it
        #: Set by the consumer: called with the free prefetch before a fetch that would take
        #: less than half the window; True puts the fetch off (see ``_brpop_start``).
        self.defer_fetch: Callable[[int], bool] | None = None
        super().__init__(*args, **kwargs)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new client for every publish, size and acknowledgement (each one
        rebuilds redis-py's table of reply parsers); one client on the channel's pool serves
        them all here. It is thread-safe: every command takes a pooled connection."""
        if client is not None:
            yield client
            return
        if self._sync_client is None:
            self._sync_client = self._create_client()
        yield self._sync_client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # redis-py 8 looks its own version up in the installed packages' metadata for every
        # connection it makes (a few milliseconds each, several connections per worker start).
        params: dict[str, Any] = super()._connparams(asynchronous)
        if DriverInfo is not None:  # redis-py 8
            params.setdefault("driver_info", DriverInfo(lib_version=redis.__version__))
        elif redis.VERSION >= (5,):
            params.setdefault("lib_version", redis.__version__)
        return params

    def put_direct(self, queue: str, body: str, headers: dict[str, Any],
                   properties: dict[str, Any], priority: int | None, wait: bool = True,
                   window: int = 1) -> None:
        """Publish a JSON ``body`` to ``queue`` through the default exchange: the message kombu's
        ``Producer.publish`` writes, in one ``LPUSH`` (see ``push``)."""
        encoded, encoding = self.encode_body(body, self.body_encoding)
        pri = self.default_priority if priority is None else priority
        # kombu's envelope, key for key (prepare_message, then _inplace_augment_message).
        message = {
            "body": encoded, "content-encoding": CONTENT_ENCODING, "content-type": CONTENT_TYPE,
            "headers": headers,
            "properties": {**properties, "delivery_info": {"exchange": "", "routing_key": queue},
                           "priority": pri, "body_encoding": encoding,
                           "delivery_tag": new_id()},
        }
        key = (self.global_keyprefix or "") + self._q_for_pri(queue, pri)
        self.push([Pushed(key.encode(), to_json(message).encode(), headers.get("id"))], wait,
                  window)

    def push(self, items: Iterable[Pushed], wait: bool = True, window: int = 1) -> None:
        """``LPUSH`` each item on a connection held for publishing. With ``wait``, return once
        Redis has answered every push so far; without, once written: the answers are read
        together later, by ``settle()`` or once ``window`` pushes are unanswered (then until
        half of them are left). TLS connections always wait.

        ``Refused`` names the pushes Redis answered with an error, once every answer sent
        before is read. On a connection error the connection is dropped; what it had not
        answered stays in ``unanswered`` for the caller to push again on a new one.

        Only a wait that closely follows another push polls for the answer (``SPIN_SECONDS``):
        one on its own blocks on the socket and leaves the CPU to Redis and to the workers,
        which on a shared machine would otherwise start its task later."""
        conn = self._publish_conn = self._publish_conn or self.own_connection()
        follows = monotonic() - self._published_at < BURST_SECONDS
        try:
            sock = conn._sock
            tls = isinstance(sock, ssl.SSLSocket)
            items = list(items)
            self.unanswered.extend(items)  # before any is written: none is lost on an error
            for item in items:
                if tls:  # redis-py reads TLS records: one command, then its answer
                    conn.send_packed_command(conn.pack_command("LPUSH", item.key, item.payload),
                                             check_health=False)
                    self._answer_tls(conn)
                else:
                    sock.sendall(b"*3\r\n$5\r\nLPUSH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                                 % (len(item.key), item.key, len(item.payload), item.payload))
            if wait:
                self._read_answers(sock, 0, SPIN_SECONDS if follows else 0.0)
            elif len(self.unanswered) >= window:
                self._read_answers(sock, window // 2)
        except OSError as exc:  # redis-py's ConnectionError is not one
            self._drop_publish_conn()
            raise RedisConnectionError(f"Error writing to Redis: {exc}") from exc
        except RedisConnectionError:
            self._drop_publish_conn()
            raise
        finally:
            self._published_at = monotonic()

    def settle(self) -> None:
        """Return once Redis has answered every push (see ``push``)."""
        if self.unanswered:
            self.push((), wait=True)

    def take_unanswered(self) -> list[Pushed]:
        """The pushes not answered yet, in order, forgotten here (for another connection)."""
        taken = list(self.unanswered)
        self.unanswered.clear()
        return taken

    def _read_answers(self, sock: Any, left: int, spin: float = 0.0) -> None:
        """Read answers until at most ``left`` pushes are unanswered, polling for up to ``spin``
        seconds before blocking; an error answer makes it read all of them, then raise."""
        buffer, unanswered = self._answers, self.unanswered
        refused: list[tuple[str | None, str]] = []
        deadline = monotonic() + spin
        while len(unanswered) > left:
            end = buffer.find(b"\r\n")
            if end < 0:  # an answer is ``:<length>\r\n`` or ``-<error>\r\n``
                chunk = _recv_now(sock)
                if chunk is None:
                    if monotonic() < deadline:
                        continue
                    chunk = sock.recv(REPLY_BUFFER)
                if not chunk:
                    raise RedisConnectionError("Connection closed by the server")
                buffer += chunk
                continue
            item = unanswered.popleft()
            if buffer.startswith(b"-"):
                refused.append((item.task_id, buffer[1:end].decode(errors="replace")))
                left = 0
            del buffer[:end + 2]
        if refused:
            raise Refused(refused)

    def _answer_tls(self, conn: Any) -> None:
        # Each push over TLS is answered before the next is written: the oldest is this one.
        item = self.unanswered.popleft()
        try:
            conn.read_response()
        except ResponseError as exc:
            raise Refused([(item.task_id, str(exc))]) from None
        except BaseException:
            self.unanswered.appendleft(item)  # its answer is unknown
            raise

    def _drop_publish_conn(self) -> None:
        if self._publish_conn is not None:
            self._publish_conn.disconnect()
        self._publish_conn = None
        self._answers.clear()

    def own_connection(self) -> Any:
        """A connection made as the channel's pool makes them, connected, held by whoever asked
        for it. Not counted by the pool: redis-py's ``make_connection`` would count it against
        ``max_connections`` for as long as the pool lives, even once dropped."""
        pool = self.pool
        conn = pool.connection_class(**pool.connection_kwargs)
        conn.connect()
        return conn

    def _drop_ack_conn(self) -> None:
        if self._ack_conn is not None:
            self._ack_conn.disconnect()
        self._ack_conn, self._ack_replies = None, 0

    def _disconnect_pools(self) -> None:
        self._sync_client = None  # its pool is being closed
        self._drop_publish_conn()
        self._drop_ack_conn()
        super()._disconnect_pools()

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._wait_next:
            self._wait_next = False
            self._blocking = True
            return super()._brpop_start(timeout)
        self._blocking = False
        free = self.qos.can_consume_max_estimate()
        if (free is not None and free * 2 < self.qos.prefetch_count
                and self.defer_fetch is not None and self.defer_fetch(free)):
            return  # the consumer has work at hand: more is fetched later, in one round trip
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        pairs = [(queue, self._q_for_pri(queue, pri))
                 for pri in self.priority_steps for queue in queues]
        prefix = self.global_keyprefix or ""
        keys = [prefix + self.unacked_index_key, prefix + self.unacked_key,
                *(prefix + key for _, key in pairs)]
        client = self.client
        if self._pop_sha is None:
            self._pop_sha = client.script_load(POP_SCRIPT)
        self._popping = [queue for queue, _ in pairs]
        self._in_poll = client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu types it None
        limit = POP_LIMIT if free is None else max(1, min(int(free), POP_LIMIT))
        client.connection.send_command("EVALSHA", self._pop_sha, len(keys), *keys, time(), limit)

    def _brpop_read(self, **options: Any) -> bool:
        blocking, self._blocking = self._blocking, False
        try:
            try:
                reply = self.client.parse_response(self.client.connection,
                                                   "BRPOP" if blocking else "EVALSHA", **options)
            except NoScriptError:  # the server restarted and forgot it: load it again
                self._pop_sha = None
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu does
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()
        if not reply:
            self._wait_next = not blocking
            raise Empty()
        if blocking:  # as kombu's: the queue's key (less its priority suffix), the message
            key, item = reply
            taken = [(bytes_to_str(key).rsplit(self.sep, 1)[0], item, False)]
        else:  # the pop script's: queue index, message, recorded by the script
            taken = [(self._popping[int(index) - 1], item, int(recorded) == 1)
                     for index, item, recorded in zip(reply[::3], reply[1::3], reply[2::3],
                                                      strict=True)]
        try:
            for queue, item, recorded in taken:
                self._queue_cycle.rotate(queue)
                payload = wirejson.loads(item)
                if recorded:
                    self.recorded.add(payload["properties"]["delivery_tag"])
                else:  # its record holds the message as Redis gave it (QoS.append)
                    self.taken = item if isinstance(item, bytes) else item.encode()
                self.connection._deliver(payload, queue)
        finally:
            self.taken = None
        return True


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with atomic consuming pops (see the module's docstring)."""

    Channel = Channel

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """kombu's, except that the step run on every turn of the loop adds only the readers the
        loop lacks: kombu's registers every socket again each turn (a system call that fails,
        as the socket is registered already, and an exception to catch)."""
        before = set(loop.on_tick)
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        added = loop.on_tick - before
        if len(added) != 1:
            return  # not the kombu this was written for: keep its step
        loop.on_tick.difference_update(added)
        cycle: Any = self.cycle
        readers, on_readable = loop.readers, self.on_readable

        def on_poll_start() -> None:
            cycle.on_poll_start()  # sends the next fetch, pauses or resumes sockets
            for fd in cycle.fds:
                if readers.get(fd) != (on_readable, (fd,)):
                    loop.add_reader(fd, on_readable, fd)

        loop.on_tick.add(on_poll_start)
