"""Fork-safe per-process resources: connections a task uses, created where it runs.

A resource wraps a factory (an MQTT client, a database connection, an HTTP session). The factory
runs lazily, once per process (or once per thread, or up to `pool_size` times for a bounded pool),
and its instance is health-checked before each use and re-created when dead. A forked child never
uses what its parent created: one after-fork hook (`conveyor._fork`) makes every resource forget the
parent's instances in the child, so the child creates its own on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from conveyor._fork import forget_in_child
from conveyor.errors import ConfigurationError, ResourceError

T = TypeVar("T")
Scope = Literal["process", "thread"]

log = logging.getLogger("conveyor.resources")


class _Empty:
    """No instance yet (a factory may well return None, so None cannot mean that)."""


_EMPTY: Final = _Empty()


class _State(Generic[T]):
    """Everything one process holds for one resource; replaced whole in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.available = threading.Condition(self.lock)  # pool: an instance came back
        self.instance: T | _Empty = _EMPTY  # scope="process"
        self.local = threading.local()  # scope="thread": this thread's instance
        self.threads: list[tuple[weakref.ref[threading.Thread], T]] = []  # every thread's
        self.idle: list[T] = []  # pool: instances not leased
        self.size = 0  # pool: instances that exist (idle, leased or being created)
        self.generation = 0  # pool: bumped by close(), so leased instances are closed on return
        self.inherited = False  # set in a forked child: the parent's, never to be touched


class Resource(Generic[T]):
    """A per-process (or per-thread, or pooled) instance made by `factory`, safe across forks.

    Usually made with `@app.resource`. `resource()` returns this process's instance
    (`scope="process"`) or this thread's (`scope="thread"`), created on first call. `with
    resource.lease() as instance:` works for every scope and is the only way in with
    `pool_size`: at most `pool_size` instances exist, each used by one borrower at a time.

    `check(instance) -> bool` runs before each use; False or an exception means the instance is
    dead: it is closed and a new one created. `close(instance)` closes one (default: its
    `close()` method, if it has one). A factory that raises lets the exception through and caches
    nothing, so the next use tries again.
    """

    def __init__(
        self,
        factory: Callable[[], T],
        name: str,
        *,
        check: Callable[[T], bool] | None = None,
        close: Callable[[T], object] | None = None,
        scope: Scope = "process",
        pool_size: int | None = None,
    ) -> None:
        if not callable(factory):
            raise ConfigurationError(f"resource {name!r}: the factory must be callable")
        for option, value in (("check", check), ("close", close)):
            if value is not None and not callable(value):
                raise ConfigurationError(
                    f"resource {name!r}: {option}= must be a function of the instance, "
                    f"not {type(value).__name__}"
                )
        if scope not in ("process", "thread"):
            raise ConfigurationError(
                f"resource {name!r}: scope must be 'process' or 'thread', not {scope!r}"
            )
        if pool_size is not None:
            if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
                raise ConfigurationError(
                    f"resource {name!r}: pool_size must be a whole number of at least 1, "
                    f"not {pool_size!r}"
                )
            if scope == "thread":
                raise ConfigurationError(
                    f"resource {name!r}: pool_size gives one pool shared by the process's "
                    "threads; drop scope='thread' (or drop pool_size for one instance per thread)"
                )
        self.name = name
        self.scope: Scope = scope
        self.pool_size = pool_size
        self._factory = factory
        self._check = check
        self._close = close
        self._state: _State[T] = _State()
        _live.add(self)

    def __repr__(self) -> str:
        pool = "" if self.pool_size is None else f" pool_size={self.pool_size}"
        return f"<Resource {self.name} scope={self.scope}{pool}>"

    def __call__(self) -> T:
        """This process's (or this thread's) live instance, created or re-created as needed."""
        if self.pool_size is not None:
            raise ConfigurationError(
                f"resource {self.name!r} is a pool (pool_size={self.pool_size}): borrow an "
                "instance with `with resource.lease() as instance:` instead of calling it"
            )
        if self.scope == "thread":
            return self._thread_instance()
        return self._process_instance()

    @contextlib.contextmanager
    def lease(self, timeout: float | None = 30.0) -> Iterator[T]:
        """Use an instance for the `with` block.

        With `pool_size`, borrow one of at most `pool_size` instances, waiting up to `timeout`
        seconds (None: no limit) for one to come back, else `ResourceError`. Without a pool,
        the block gets this process's (or thread's) instance and `timeout` does not apply.
        """
        if self.pool_size is None:
            yield self._thread_instance() if self.scope == "thread" else self._process_instance()
            return
        state, generation, instance = self._borrow(self.pool_size, timeout)
        try:
            yield instance
        finally:
            self._give_back(state, generation, instance)

    def close(self) -> None:
        """Close every instance this process holds; the next use creates a new one.

        Pooled instances leased right now are closed when they come back. Errors are logged,
        never raised.
        """
        state = self._state
        with state.lock:
            instances: list[T] = [] if isinstance(state.instance, _Empty) else [state.instance]
            state.instance = _EMPTY
            instances += [instance for _, instance in state.threads]
            state.threads = []
            state.local = threading.local()
            instances += state.idle
            state.size -= len(state.idle)
            state.idle = []
            state.generation += 1
            state.available.notify_all()
        for instance in instances:
            self._close_instance(instance)

    # scope="process"

    def _process_instance(self) -> T:
        state = self._state
        instance = state.instance  # read without the lock: the common case costs one check
        if not isinstance(instance, _Empty) and self._healthy(instance):
            return instance
        with state.lock:
            current = state.instance
            if current is not instance:  # another thread (or close()) got here first
                if not isinstance(current, _Empty):
                    return current
            elif not isinstance(instance, _Empty):
                state.instance = _EMPTY
                self._close_instance(instance)
            state.instance = created = self._create()
            return created

    # scope="thread"

    def _thread_instance(self) -> T:
        state = self._state
        local = state.local
        instance: T | _Empty = getattr(local, "instance", _EMPTY)
        if not isinstance(instance, _Empty):
            if self._healthy(instance):
                return instance
            local.instance = _EMPTY
            with state.lock:
                state.threads = [entry for entry in state.threads if entry[1] is not instance]
            self._close_instance(instance)
        created = self._create()
        thread = threading.current_thread()
        with state.lock:
            # Threads that ended cannot use theirs any more: close those now, not at shutdown.
            ended = [entry for entry in state.threads if not _running(entry[0])]
            state.threads = [entry for entry in state.threads if _running(entry[0])]
            state.threads.append((weakref.ref(thread), created))
            state.local.instance = created  # close() may have replaced `local` meanwhile
        for _, old in ended:
            self._close_instance(old)
        return created

    # pool_size=N

    def _borrow(self, pool_size: int, timeout: float | None) -> tuple[_State[T], int, T]:
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self._state
        with state.available:
            while not state.idle and state.size >= pool_size:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ResourceError(
                        f"resource {self.name!r}: all {pool_size} instances stayed leased for "
                        f"{timeout}s; raise pool_size, wait longer with lease(timeout=...), or "
                        "hold leases for less time"
                    )
                state.available.wait(remaining)
            generation = state.generation
            instance: T | _Empty = state.idle.pop() if state.idle else _EMPTY
            if isinstance(instance, _Empty):
                state.size += 1  # this slot is ours while the factory runs
        try:
            if not isinstance(instance, _Empty) and self._healthy(instance):
                return state, generation, instance
            if not isinstance(instance, _Empty):
                self._close_instance(instance)
            return state, generation, self._create()
        except BaseException:
            if not state.inherited:  # the slot is free again, whatever close() did meanwhile
                with state.available:
                    state.size -= 1
                    state.available.notify()
            raise

    def _give_back(self, state: _State[T], generation: int, instance: T) -> None:
        if state.inherited:  # leased across a fork: the parent's, dropped untouched
            _inherited.append(instance)
            return
        with state.available:
            if state.generation == generation:
                state.idle.append(instance)
                state.available.notify()
                return
            state.size -= 1  # close() ran while it was leased
            state.available.notify()
        self._close_instance(instance)

    # shared

    def _create(self) -> T:
        instance = self._factory()  # an exception goes to the caller; nothing is cached
        log.info(
            "resource %s created in pid %d (thread %s)",
            self.name,
            os.getpid(),
            threading.current_thread().name,
        )
        return instance

    def _healthy(self, instance: T) -> bool:
        if self._check is None:
            return True
        raised = ""
        try:
            if self._check(instance):
                return True
        except Exception as exc:
            # Only the type: the message of a connection error may carry a URL with a password.
            raised = f" (check raised {type(exc).__name__})"
        log.warning(
            "resource %s: dead in pid %d (thread %s), re-creating%s",
            self.name,
            os.getpid(),
            threading.current_thread().name,
            raised,
        )
        return False

    def _close_instance(self, instance: T) -> None:
        try:
            if self._close is not None:
                self._close(instance)
            else:
                close = getattr(instance, "close", None)
                if callable(close):
                    close()
        except Exception as exc:
            log.warning(
                "resource %s: closing an instance in pid %d (thread %s) failed: %s",
                self.name,
                os.getpid(),
                threading.current_thread().name,
                type(exc).__name__,
            )

    def _forget_after_fork(self) -> None:
        self._state.inherited = True
        _inherited.append(self._state)
        self._state = _State()


class ResourceDecorator(Protocol):
    """What `@app.resource(...)` returns: it turns a factory into a `Resource` of its type."""

    def __call__(self, factory: Callable[[], T], /) -> Resource[T]:
        """Register `factory` as a resource."""
        ...


class Resources:
    """The resources registered on an app: iterable, `get(name)`, `close_all()`."""

    def __init__(self) -> None:
        self._by_name: dict[str, Resource[Any]] = {}

    def __iter__(self) -> Iterator[Resource[Any]]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        return f"<Resources {', '.join(self._by_name) or 'none'}>"

    def add(self, resource: Resource[Any]) -> None:
        """Register `resource`; a second one under the same name is a `ConfigurationError`."""
        if resource.name in self._by_name:
            raise ConfigurationError(
                f"two resources are named {resource.name!r}: pass name=... to one"
            )
        self._by_name[resource.name] = resource

    def get(self, name: str) -> Resource[Any] | None:
        """The resource registered under `name`, or None."""
        return self._by_name.get(name)

    def close_all(self) -> None:
        """Close every instance of every resource in this process; errors are logged only."""
        for resource in self:
            try:
                resource.close()
            except Exception:  # close() logs its own errors; this is a last line of defence
                log.exception("resource %s: closing failed", resource.name)


def _running(ref: weakref.ref[threading.Thread]) -> bool:
    thread = ref()
    return thread is not None and thread.is_alive()


# Every resource in this process, for the fork hook. What a child inherits is kept referenced and
# never closed or collected: closing (or a finalizer) could talk over the parent's socket, e.g.
# send an MQTT DISCONNECT or a database's terminate message on the parent's connection.
_live: weakref.WeakSet[Resource[Any]] = weakref.WeakSet()
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    # Only the forking thread exists here. Fresh state means fresh locks, so a lock another
    # thread of the parent held at fork time cannot deadlock the child.
    for resource in list(_live):
        resource._forget_after_fork()


forget_in_child(_after_fork_in_child)
