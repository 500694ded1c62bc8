"""The event loop a RabbitMQ broker's connection lives on, and how calls from any thread reach it.

A broker's connection belongs to one event loop. Until a worker attaches its own loop, that is a
loop run by a daemon thread of the broker's (`conveyor-amqp`), started on first use: calls from
any other thread submit a coroutine to it and wait. Attached, the loop is the worker's and no
thread is started; a blocking call from that loop's own thread would wait forever, so it raises.

Neither the thread nor the connection outlives the broker. A broker garbage-collected without
`close()` drops its `Bridge`, whose finalizer closes the connection and stops the thread (the
socket would pass for a user's own connection to the next prefork worker in the process, and the
thread would run forever). A forked child has neither thread nor connection: every live bridge
has its owner forget them there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiormq.abc

from conveyor._fork import forget_in_child

T = TypeVar("T")

_live: weakref.WeakSet[Bridge] = weakref.WeakSet()


class Held:
    """The connection a broker's own thread serves, known apart from the `Bridge` (whose
    finalizer closes it, so must not hold the bridge itself)."""

    connection: aiormq.abc.AbstractConnection | None = None


class Bridge:
    """The loop a broker's connection lives on: its own thread's, or the worker's it attached to.

    `forget` is the owner's reset, run in a forked child; it must call `Bridge.forget`. It is
    held weakly, so that the bridge never keeps its owner alive.
    """

    def __init__(self, forget: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._owner_forgets = weakref.WeakMethod(forget)
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.forget()
        _live.add(self)

    def forget(self) -> None:
        """Let go of the loop, its thread and the connection (a new process, or after close)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self.held = Held()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        # Set while attached to a worker's event loop: the ident of the thread running it.
        self.attached = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on the calling thread's loop, the worker's, from now on."""
        with self._lock:
            self.loop, self.attached = loop, threading.get_ident()

    def blocked(self) -> bool:
        """True on the attached worker loop's own thread, where blocking calls cannot wait."""
        return bool(self.attached) and threading.get_ident() == self.attached

    def submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the loop (the broker's own thread's is started on first use)."""
        if self.attached and threading.get_ident() == self.attached:
            _close(coroutine)
            raise RuntimeError(
                "a blocking RabbitMQ call on the worker's own event loop would wait forever"
            )
        with self._lock:
            if self.loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="conveyor-amqp", daemon=True
                )
                thread.start()
                self.loop, self.thread = loop, thread
                # Dropped without close(), the broker still closes its connection and thread.
                self._finalizer = weakref.finalize(self, _close_dropped, loop, thread, self.held)
                self._finalizer.atexit = False
            loop = self.loop
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coroutine), loop)

    def run(self, coroutine: Awaitable[T], timeout: float) -> T:
        """Run a coroutine on the loop and wait for it, from any other thread."""
        future = self.submit(coroutine)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def run_async(self, coroutine: Awaitable[T], timeout: float) -> T:
        """`run` for a caller on another event loop: it awaits instead of blocking a thread."""
        future = asyncio.wrap_future(self.submit(coroutine))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the broker's own thread and close its loop (once the connection is closed)."""
        loop = self.loop
        if loop is None or self.attached:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self.thread is not None:
            self.thread.join(5)
        if not loop.is_running():
            loop.close()

    def _in_child(self) -> None:
        forget = self._owner_forgets()
        if forget is not None:
            forget()
        else:
            self.forget()


def _close_dropped(loop: asyncio.AbstractEventLoop, thread: threading.Thread, held: Held) -> None:
    """A broker garbage-collected without `close()`: close its connection and stop its thread,
    so that neither outlives it."""
    if loop.is_closed() or not thread.is_alive():
        return
    future = asyncio.run_coroutine_threadsafe(_shut_dropped(held.connection), loop)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
    if threading.current_thread() is not thread:
        with contextlib.suppress(Exception):
            future.result(3)
        thread.join(1)
        if not loop.is_running():
            loop.close()


async def _shut_dropped(connection: aiormq.abc.AbstractConnection | None) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 2)


def _forget_after_fork() -> None:
    for bridge in list(_live):
        bridge._in_child()


forget_in_child(_forget_after_fork)


def _close(coroutine: Awaitable[Any]) -> None:
    """Discard a coroutine that will never run (without a "never awaited" warning)."""
    if isinstance(coroutine, Coroutine):
        coroutine.close()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
