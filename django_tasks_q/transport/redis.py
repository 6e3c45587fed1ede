"""Adapters: Redis, where a message leaves its queue and is recorded as unacked in one step.

kombu's Redis transport takes a message with ``BRPOP`` and records it as unacknowledged in a
second command. A worker killed between the two loses the message: it is in no list any more
and in no unacked table, so nothing ever delivers it again. Under load that window is wide, as
the reply waits in the socket while the worker is busy with other messages.

Here a message is taken by a script that pops it and records it in the same atomic step, in
kombu's own unacked layout (so kombu's and Celery's restore, acknowledge and reject work on it
unchanged). Several are taken per round trip, up to the free prefetch. Only when every queue is
empty does the channel block in ``BRPOP`` to wait for the next message; one that arrives then is
recorded as kombu records it, a round trip later.
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

from .base import RedisChannel, RedisQoS

#: The most messages one round trip takes (the free prefetch bounds it too).
POP_LIMIT = 100

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


class QoS(RedisQoS):
    """kombu's, except that a message the pop script recorded is not written again."""

    channel: Channel

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded = self.channel.recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(RedisChannel):
    """A Redis channel whose consuming pops are atomic with their unacked record."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded: set[str] = set()  # tags taken by the script, not yet handed to QoS
        self._pop_sha: str | None = None
        self._popping: list[str] = []  # the queue of each key of the script in flight
        self._blocking = False  # the command in flight is a BRPOP, not the script
        self._wait_next = False  # the last script found every queue empty
        super().__init__(*args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._wait_next:
            self._wait_next = False
            self._blocking = True
            return super()._brpop_start(timeout)
        self._blocking = False
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
        client.connection.send_command("EVALSHA", self._pop_sha, len(keys), *keys, time(),
                                       self._pop_limit())

    def _pop_limit(self) -> int:
        free = self.qos.can_consume_max_estimate()
        return POP_LIMIT if free is None else max(1, min(int(free), POP_LIMIT))

    def _brpop_read(self, **options: Any) -> bool:
        if self._blocking:
            self._blocking = False
            return bool(super()._brpop_read(**options))
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVALSHA", **options)
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
            self._wait_next = True
            raise Empty()
        for index, item, recorded in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
            queue = self._popping[int(index) - 1]
            self._queue_cycle.rotate(queue)
            payload = loads(bytes_to_str(item))
            if int(recorded):
                self.recorded.add(payload["properties"]["delivery_tag"])
            self.connection._deliver(payload, queue)
        return True


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with atomic consuming pops (see the module's docstring)."""

    Channel = Channel
