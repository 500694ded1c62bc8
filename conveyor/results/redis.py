"""Results in Redis: expired by Redis itself, and waiters woken by pub/sub instead of polling.

Keys, under the URL's `?prefix=` (default `conveyor`):

- `{prefix}:result:{id}`: a hash of `state` and `data` (the encoded record) that Redis deletes at
  the record's `expires_at`, so expired results need no cleanup process;
- `{prefix}:results`: a sorted set of ids by expiry, so counting live results needs no scan;
- `{prefix}:done:{id}`: a pub/sub channel told when a task finished.

Connections are resources (`conveyor.resources.Resource`): created on first use in each process,
never shared with a forked child, which makes its own.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.commands.core import Script

from conveyor.brokers.base import connects
from conveyor.errors import ConfigurationError, ResultError
from conveyor.redact import redact_text, redact_url
from conveyor.resources import Resource
from conveyor.results.base import (
    READY_STATES,
    ResultRecord,
    ResultStore,
    decode_record,
    encode_record,
)

log = logging.getLogger("conveyor.results")

DEFAULT_PREFIX = "conveyor"
DEFAULT_PORT = 6379
# A waiting call reads its record again this often even without a notice: a safety net for a
# notice lost with a connection, not the way results normally arrive.
RECHECK_S = 5.0
# The listener thread wakes this often to unsubscribe channels nobody waits on any more.
LISTEN_TURN_S = 1.0
# With nobody waiting this long, the listener closes its connection and its thread ends.
LISTENER_IDLE_S = 30.0
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0

_FINISHED = ", ".join(f"{state} = true" for state in sorted(READY_STATES))
# Atomic, so a STARTED record arriving late can never replace a SUCCESS written meanwhile.
# KEYS: the expiry index, then one result hash per record.
# ARGV: now (ms), the done-channel prefix, then per record: id, state, data, expires_at (ms).
_PUT = f"""
local finished = {{{_FINISHED}}}
local index, now, channels = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local latest, latest_ms = 0, nil
for i = 2, #KEYS do
    local key, a = KEYS[i], 3 + (i - 2) * 4
    local id, state, data, expires_ms = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
    local old = redis.pcall("HGET", key, "state")
    if type(old) == "table" then
        -- not a hash: a corrupt or foreign value where ours belongs, which ours replaces
        redis.call("DEL", key)
        old = false
    end
    if finished[state] or not finished[old] then
        redis.call("HSET", key, "state", state, "data", data)
        redis.call("PEXPIREAT", key, expires_ms)
        redis.call("ZADD", index, expires_ms, id)
        if tonumber(expires_ms) > latest then
            latest, latest_ms = tonumber(expires_ms), expires_ms
        end
        if finished[state] then
            redis.call("PUBLISH", channels .. id, state)
        end
    end
end
redis.call("ZREMRANGEBYSCORE", index, "-inf", now)
if latest > now then
    local ttl = redis.call("PTTL", index)
    if ttl < 0 or now + ttl < latest then
        redis.call("PEXPIREAT", index, latest_ms)
    end
end
return 0
"""


@dataclass(frozen=True, slots=True)
class _Client:
    """One process's connection pool, with the put script registered on it."""

    redis: redis.Redis
    put: Script


class RedisResultStore(ResultStore):
    """Results in Redis: `redis://[user:password@]host:port/db?prefix=...`, or `rediss://` (TLS).

    Other query options go to redis-py (`socket_timeout`, `ssl_cert_reqs`, ...). `wait` is woken
    by a pub/sub notice within a millisecond of the task's record being stored.
    """

    def __init__(self, url: str) -> None:
        self.display_url = redact_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for name, value in query if name == "prefix"]
        self.prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
        if not self.prefix:
            raise ConfigurationError(
                f"result store {self.display_url}: ?prefix= is empty; name a key prefix, or "
                f"leave it out for {DEFAULT_PREFIX!r}"
            )
        options = [(name, value) for name, value in query if name != "prefix"]
        self._url = urlunsplit(parts._replace(query=urlencode(options)))
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigurationError(
                f"result store {self.display_url}: the port must be a number"
            ) from None
        self.endpoints = frozenset({(parts.hostname or "localhost", port)})
        self._check_options()
        self._index = f"{self.prefix}:results"
        self._channels = f"{self.prefix}:done:"
        self._clients: Resource[_Client] = Resource(
            self._connect, f"results {self.display_url}", close=_close_client
        )
        self._listeners: Resource[_Listener] = Resource(
            lambda: _Listener(self._clients().redis, self.prefix, self.display_url),
            f"results listener {self.display_url}",
        )
        connects(self)

    def __repr__(self) -> str:
        return f"<RedisResultStore {self.display_url}>"

    def put(self, records: Sequence[ResultRecord]) -> None:
        """Store records in one atomic script; finished ones are announced to waiters.

        The script applies `should_replace`'s rule: a finished record is never overwritten by
        an unfinished one, even one that was written a moment before by another worker.
        """
        if not records:
            return
        keys = [self._index]
        args: list[bytes | str | int] = [_ms(time.time()), self._channels]
        for record in records:
            keys.append(self._key(record.id))
            args += [record.id, record.state.value, encode_record(record), _ms(record.expires_at)]
        client = self._clients()
        with self._errors("store results"):
            client.put(keys=keys, args=args, client=client.redis)

    def get(self, task_id: str) -> ResultRecord | None:
        """The live record for a task id, or `ResultError` if what is stored is not ours."""
        return self._read(task_id)

    def wait(self, task_id: str, timeout: float | None) -> ResultRecord | None:
        """Wait for the finished record without polling: a pub/sub notice wakes this call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        record = self._read(task_id)
        if record is not None and record.state in READY_STATES:
            return record
        if timeout is not None and timeout <= 0:
            return None
        # The record is read again once the subscription is confirmed: a task that finished
        # between the first read and the subscription is not missed.
        with (
            self._errors("wait for a result"),
            self._listeners().watch(f"{self._channels}{task_id}".encode()) as watch,
        ):
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                watch.woken.wait(RECHECK_S if remaining is None else min(remaining, RECHECK_S))
                watch.woken.clear()
                if watch.error is not None:
                    raise ResultError(
                        f"result store {self.display_url}: cannot wait for results: "
                        f"{watch.error}; waiting needs SUBSCRIBE (a Redis user with ACLs "
                        f"needs permission for the {self.prefix}:* channels)"
                    )
                record = self._read(task_id)
                if record is not None and record.state in READY_STATES:
                    return record

    def forget(self, task_id: str) -> None:
        """Delete a record."""
        with self._errors("delete a result"):
            pipe = self._clients().redis.pipeline(transaction=True)
            pipe.delete(self._key(task_id))
            pipe.zrem(self._index, task_id)
            pipe.execute()

    def cleanup(self) -> int:
        """Prune expired ids from the index; the count pruned.

        Redis deletes expired records itself, at their `expires_at`, and each `put` prunes the
        index too: this is never needed, only offered.
        """
        with self._errors("clean up results"):
            removed = self._clients().redis.zremrangebyscore(self._index, "-inf", _ms(time.time()))
        return int(removed)

    def count(self) -> int:
        """Live records."""
        with self._errors("count results"):
            live = self._clients().redis.zcount(self._index, f"({_ms(time.time())}", "+inf")
        return int(live)

    def close(self) -> None:
        """Close this process's listener and connections; the next use opens new ones."""
        self._listeners.close()
        self._clients.close()

    def _key(self, task_id: str) -> str:
        return f"{self.prefix}:result:{task_id}"

    def _read(self, task_id: str) -> ResultRecord | None:
        key = self._key(task_id)
        try:
            data = self._clients().redis.hget(key, "data")
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise ResultError(
                    f"the stored result is corrupt or not conveyor's: {key} in "
                    f"{self.display_url} is not a hash; forget() deletes it"
                ) from None
            raise self._error("read a result", exc) from None
        except redis.RedisError as exc:
            raise self._error("read a result", exc) from None
        if data is None:
            return None
        try:
            if not isinstance(data, bytes):
                raise ResultError(f"the stored result is corrupt or not conveyor's: {data!r}")
            return decode_record(data)
        except ResultError as exc:
            raise ResultError(f"{exc} ({key} in {self.display_url}; forget() deletes it)") from None

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise self._error(action, exc) from None

    def _error(self, action: str, exc: redis.RedisError) -> ResultError:
        # `from None` at every raise: redis-py's own exception carries nothing more, and a
        # traceback chained to it should not be where credentials could ever show.
        if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
            hint = "check the user name and password in the result store URL"
        elif isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            hint = f"is Redis running and reachable at {_endpoint(self.endpoints)}?"
        elif str(exc).startswith("NOPERM"):
            hint = f"the Redis user needs permission for the {self.prefix}:* keys and channels"
        else:
            hint = "check the result store URL and the Redis server's log"
        return ResultError(
            f"result store {self.display_url}: could not {action}: {type(exc).__name__}: "
            f"{redact_text(str(exc))}; {hint}"
        )

    def _check_options(self) -> None:
        """Make one connection object (no socket yet), so a bad option fails here, not later."""
        try:
            pool = redis.ConnectionPool.from_url(self._url)
            pool.make_connection()
        except (TypeError, ValueError, redis.RedisError) as exc:
            raise ConfigurationError(
                f"invalid result store URL {self.display_url}: {redact_text(str(exc))}"
            ) from None
        pool.disconnect()

    def _connect(self) -> _Client:
        client = redis.Redis.from_url(
            self._url,
            socket_connect_timeout=5.0,
            socket_keepalive=True,
            health_check_interval=30,
            # Named for the prefix, so CLIENT LIST shows whose connections these are.
            client_name="conveyor:" + re.sub(r"[^\w.:-]", "_", self.prefix),
        )
        return _Client(client, client.register_script(_PUT))


def _close_client(client: _Client) -> None:
    client.redis.close()


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _endpoint(endpoints: frozenset[tuple[str, int]]) -> str:
    return ", ".join(f"{host}:{port}" for host, port in sorted(endpoints))


class _Watch:
    """One waiting call: woken once its channel is subscribed, and by every notice on it."""

    __slots__ = ("channel", "error", "woken")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self.woken = threading.Event()
        self.error: str | None = None


class _Listener:
    """This process's one pub/sub connection, serving every waiting call.

    A thread of its own is the only user of the connection (redis-py's PubSub is not safe to
    share between threads). Waiting calls say which channels they want; a notice on the
    listener's private control channel tells the thread to subscribe them now. The thread
    starts with the first waiting call and ends after `LISTENER_IDLE_S` without one.
    """

    def __init__(self, client: redis.Redis, prefix: str, name: str) -> None:
        self._client = client
        self._name = name
        self._control = f"{prefix}:listener:{uuid.uuid4().hex}".encode()
        self._lock = threading.Lock()
        self._watches: dict[bytes, set[_Watch]] = {}
        self._changed = False  # the wanted channels changed since the thread last subscribed
        self._subscribed: set[bytes] = set()  # asked for on this connection
        self._unconfirmed: dict[bytes, int] = {}  # SUBSCRIBEs sent and not yet confirmed
        self._ready = False  # subscribed to the control channel: notices reach the thread
        self._thread: threading.Thread | None = None
        self._idle_since = time.monotonic()
        self._backoff = RECONNECT_MIN_S  # before connecting again after a failure
        self._closing = threading.Event()

    @contextlib.contextmanager
    def watch(self, channel: bytes) -> Iterator[_Watch]:
        """Register a waiting call on `channel` for the `with` block."""
        watch = _Watch(channel)
        with self._lock:
            watchers = self._watches.setdefault(channel, set())
            watchers.add(watch)
            if channel in self._subscribed and not self._unconfirmed.get(channel):
                watch.woken.set()  # already subscribed for another call: read right away
            elif channel not in self._subscribed:
                self._changed = True
            tell = self._changed and self._ready
            if self._thread is None and not self._closing.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-results-listener", daemon=True
                )
                self._thread.start()
        try:
            if tell:
                self._client.publish(self._control, b"")
            yield watch
        finally:
            with self._lock:
                watchers.discard(watch)
                if not watchers and self._watches.get(channel) is watchers:
                    del self._watches[channel]
                    self._changed = True
                    if not self._watches:
                        self._idle_since = time.monotonic()

    def close(self) -> None:
        """Stop the thread (within `LISTEN_TURN_S`); waiting calls read their records again."""
        self._closing.set()
        with self._lock:
            thread, ready = self._thread, self._ready
            for watchers in self._watches.values():
                for watch in watchers:
                    watch.woken.set()
        if ready:
            with contextlib.suppress(redis.RedisError):
                self._client.publish(self._control, b"")
        if thread is not None and thread is not threading.current_thread():
            thread.join(LISTEN_TURN_S * 2)

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                try:
                    if self._serve():
                        return
                except Exception as exc:  # lost, refused, or a bug: nobody may wait in vain
                    self._failed(exc)
                    if self._idle(0.0) or self._closing.wait(self._backoff):
                        return
                    self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _serve(self) -> bool:
        """Listen on one connection until idle (True), closing (False) or an error (raised)."""
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        with self._lock:
            self._subscribed, self._unconfirmed, self._ready = set(), {}, False
            self._changed = True
        try:
            pubsub.subscribe(self._control)
            while not self._closing.is_set():
                message = pubsub.get_message(timeout=LISTEN_TURN_S)
                if message is not None:
                    self._handle(message)
                elif self._idle(LISTENER_IDLE_S):
                    return True
                self._resubscribe(pubsub)
            return False
        finally:
            with self._lock:
                self._ready = False
            pubsub.close()

    def _handle(self, message: dict[str, Any]) -> None:
        channel, kind = message.get("channel"), message.get("type")
        if not isinstance(channel, bytes):
            return
        with self._lock:
            if channel == self._control:
                if kind == "subscribe":
                    self._ready = True
                    self._backoff = RECONNECT_MIN_S
                return
            if kind == "subscribe":
                left = self._unconfirmed.get(channel, 0) - 1
                if left > 0:
                    self._unconfirmed[channel] = left
                    return
                self._unconfirmed.pop(channel, None)
            elif kind != "message":
                return
            for watch in self._watches.get(channel, ()):
                watch.woken.set()

    def _resubscribe(self, pubsub: redis.client.PubSub) -> None:
        """Subscribe the channels waiting calls want; unsubscribe those nobody waits on."""
        with self._lock:
            if not self._changed:
                return
            self._changed = False
            wanted = set(self._watches)
            add, drop = wanted - self._subscribed, self._subscribed - wanted
            self._subscribed = wanted
            for channel in add:
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        if add:
            pubsub.subscribe(*add)
        if drop:
            pubsub.unsubscribe(*drop)  # type: ignore[no-untyped-call]

    def _idle(self, grace: float) -> bool:
        """True (and the thread is to end) when nobody waited for `grace` seconds."""
        with self._lock:
            if self._watches or time.monotonic() - self._idle_since < grace:
                return False
            self._thread = None  # a waiting call from now on starts a new thread
            return True

    def _failed(self, exc: BaseException) -> None:
        refused = isinstance(exc, redis.ResponseError)
        message = f"{type(exc).__name__}: {redact_text(str(exc))}"
        log.warning("results listener for %s failed (%s); reconnecting", self._name, message)
        with self._lock:
            for watchers in self._watches.values():
                for watch in watchers:
                    if refused:
                        watch.error = message
                    watch.woken.set()  # each reads its record again, or meets the error itself
