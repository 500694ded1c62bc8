"""`Conveyor`: settings, the task registry, and the wiring to a broker and a result store."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload

import msgspec

from conveyor import brokers, results
from conveyor.brokers import Broker, Outgoing
from conveyor.errors import ConfigurationError, UnknownTaskError
from conveyor.message import Envelope, encode
from conveyor.middleware.hooks import Hooks, check_middleware
from conveyor.redact import redact_url
from conveyor.resources import Resource, ResourceDecorator, Resources, Scope
from conveyor.results import ResultStore
from conveyor.results.handle import Result
from conveyor.settings import Settings
from conveyor.signing import Signer
from conveyor.task import TASK_OPTION_NAMES, Task, parse_options

if TYPE_CHECKING:
    import datetime as dt

    from conveyor.revocations import RevocationStore
    from conveyor.scheduler.schedules import Missed, Schedule

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


class Conveyor:
    """A task queue application: where tasks are registered and sent from.

    `broker` defaults to the embedded SQLite broker (`sqlite:///conveyor.db`). `results` defaults
    to the same SQLite file with the SQLite broker, to memory with `memory://`, and to none
    otherwise; `results=None` stores no results. Other settings (see `Settings`) can be passed as
    keyword arguments or `CONVEYOR_*` environment variables. `middleware` is added in order,
    as by `add_middleware`.
    """

    def __init__(
        self,
        name: str,
        *,
        broker: str | None = None,
        results: str | _Unset | None = UNSET,
        middleware: Iterable[object] = (),
        **settings: Any,
    ) -> None:
        if results is None:
            settings["ignore_results"] = True
        elif not isinstance(results, _Unset):
            settings["results"] = results
        self.name = name
        self.settings = Settings.load(broker=broker, **settings)
        key = self.settings.signing_key
        self.signer = None if key is None else Signer(key, self.settings.verify_keys)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.process_start_hooks: list[Callable[[], None]] = []
        self.schedules: dict[str, Schedule] = {}
        self.resources = Resources()
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._results: ResultStore | _Unset | None = UNSET
        self._revocations: RevocationStore | _Unset | None = UNSET
        #: `module:attribute`, when `load_app` imported this app (the worker command does).
        self.import_path: str | None = None
        self.middleware: list[object] = []
        #: The middleware's hooks by kind (see `conveyor.middleware.hooks`); a worker adds the
        #: built-in signal middleware when `conveyor.signals` have receivers (`worker_hooks`).
        self.hooks = Hooks()
        #: The options structs middleware declared, and task option name -> who declared it.
        self.option_structs: list[type[msgspec.Struct]] = []
        self._option_owners: dict[str, str] = {}
        for m in middleware:
            self.add_middleware(m)

    def __repr__(self) -> str:
        return f"<Conveyor {self.name} broker={redact_url(self.settings.broker)}>"

    @property
    def broker(self) -> Broker:
        """The broker, connected lazily on first use."""
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = brokers.from_url(
                        self.settings.broker,
                        visibility_timeout=self.settings.visibility_timeout,
                        max_priority=self.settings.queue_max_priority,
                        queue_type=self.settings.queue_type,
                        delivery_limit=self.settings.delivery_limit,
                        max_message_size=self.settings.max_message_size,
                    )
        return self._broker

    @property
    def results(self) -> ResultStore | None:
        """The result store, or None when results are not kept."""
        if isinstance(self._results, _Unset):
            with self._lock:
                if isinstance(self._results, _Unset):
                    url = self._results_url()
                    if url is not None and url.startswith("rpc:"):
                        from conveyor.results.rpc import RpcResultStore

                        self._results = RpcResultStore(url, lambda: self.broker)
                    else:
                        self._results = None if url is None else results.from_url(url)
        return self._results

    @property
    def revocations(self) -> RevocationStore | None:
        """Where revoked task ids are kept (the fleet store, `conveyor.fleet`), or None when
        the app has none."""
        if isinstance(self._revocations, _Unset):
            from conveyor import fleet, revocations

            with self._lock:
                if isinstance(self._revocations, _Unset):
                    url = fleet.store_url(self.settings, memory=True)
                    self._revocations = None if url is None else revocations.from_url(url)
        return self._revocations

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, /, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self, fn: Callable[P, R] | None = None, /, **options: Any
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task: `@app.task` or `@app.task(queue="images", ...)`.

        Unknown or ill-typed options raise `ConfigurationError` right here.
        """
        parsed, autoretry_for, extra = parse_options(options, self.option_structs)

        def register(fn: Callable[P, R]) -> Task[P, R]:
            name = parsed.name or _default_name(fn)
            if name in self.tasks and self.tasks[name].fn is not fn:
                raise ConfigurationError(f"two tasks are named {name!r}: pass name=... to one")
            task: Task[P, R] = Task(self, fn, name, parsed, autoretry_for, extra)
            self.tasks[name] = task
            return task

        return register if fn is None else register(fn)

    @overload
    def resource(self, factory: Callable[[], T], /) -> Resource[T]: ...

    @overload
    def resource(
        self,
        /,
        *,
        name: str | None = None,
        check: Callable[[Any], bool] | None = None,
        close: Callable[[Any], object] | None = None,
        scope: Scope = "process",
        pool_size: int | None = None,
    ) -> ResourceDecorator: ...

    def resource(
        self,
        factory: Callable[[], T] | None = None,
        /,
        *,
        name: str | None = None,
        check: Callable[[Any], bool] | None = None,
        close: Callable[[Any], object] | None = None,
        scope: Scope = "process",
        pool_size: int | None = None,
    ) -> Resource[T] | ResourceDecorator:
        """Register a fork-safe resource: `@app.resource` or `@app.resource(check=..., ...)`.

        The factory runs lazily, once per process (per thread with `scope="thread"`; up to
        `pool_size` instances with a pool), again in a forked child, and again when `check`
        finds the instance dead. See `Resource`. Names default to `module.function`; two
        resources of one name raise `ConfigurationError`.
        """

        def register(factory: Callable[[], R]) -> Resource[R]:
            if name is None and not hasattr(factory, "__qualname__"):
                raise ConfigurationError(
                    f"a {type(factory).__name__} object has no function name to name the "
                    "resource after: pass name=... to @app.resource"
                )
            resource = Resource(
                factory,
                name or _default_name(factory),
                check=check,
                close=close,
                scope=scope,
                pool_size=pool_size,
            )
            self.resources.add(resource)
            return resource

        return register if factory is None else register(factory)

    def add_middleware(self, middleware: object, /) -> None:
        """Add a middleware (see `conveyor.middleware.Middleware`); its hooks run after those
        of the middleware added before it.

        Add it before decorating tasks that use the task options it declares. An object with
        no hook and no options, a misspelled hook, or an option another middleware (or
        conveyor itself) already declares raises `ConfigurationError`.
        """
        taken = self._option_owners or dict.fromkeys(TASK_OPTION_NAMES, "conveyor")
        options = check_middleware(middleware, taken)
        self.middleware.append(middleware)
        if options is not None:
            self.option_structs.append(options)
            owner = f"middleware {type(middleware).__qualname__}"
            taken.update((field, owner) for field in options.__struct_fields__)
            self._option_owners = taken
        self.hooks = Hooks(self.middleware)

    def on_process_start(self, fn: Callable[[], None], /) -> Callable[[], None]:
        """Register a function every process that runs tasks calls before its first task.

        With the prefork pool that is each child, after its fork and before WORKER_UP; with
        the other pools, the worker process itself, once. Open per-process resources here
        (database or MQTT connections), never at import time: children must not share the
        worker's sockets.
        """
        self.process_start_hooks.append(fn)
        return fn

    def schedule(
        self,
        task: Task[..., Any] | str,
        *,
        cron: str | None = None,
        every: dt.timedelta | None = None,
        tz: str = "UTC",
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        missed: Missed = "once",
        max_missed: int = 100,
        grace: dt.timedelta | None = None,
    ) -> Schedule:
        """Send `task` at every tick of `cron` (in time zone `tz`) or `every` interval.

        `conveyor scheduler` (or `conveyor worker --scheduler`) sends the ticks; see
        docs/periodic-tasks.md. The schedule is named after the task unless `name` is given; an
        invalid expression, time zone or a second schedule of the same name raises
        `ConfigurationError` here.
        """
        from conveyor.scheduler.schedules import Schedule

        task_name = task if isinstance(task, str) else task.name
        name = name or task_name
        if name in self.schedules:
            raise ConfigurationError(f"two schedules are named {name!r}: pass name=... to one")
        entry = Schedule(
            name,
            task_name,
            cron=cron,
            every=every,
            tz=tz,
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            missed=missed,
            max_missed=max_missed,
            grace=grace,
        )
        if isinstance(task, Task):  # the arguments are checked now, as a send would
            task.envelope(entry.args, entry.kwargs)
        self.schedules[name] = entry
        return entry

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: dt.timedelta | None = None,
        tz: str = "UTC",
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        missed: Missed = "once",
        max_missed: int = 100,
        grace: dt.timedelta | None = None,
    ) -> Callable[[Task[P, R]], Task[P, R]]:
        """`app.schedule` as a decorator, above `@app.task`."""

        def register(task: Task[P, R]) -> Task[P, R]:
            if not isinstance(task, Task):
                raise ConfigurationError(
                    f"@app.periodic goes above @app.task, not on {task!r} itself"
                )
            self.schedule(
                task,
                cron=cron,
                every=every,
                tz=tz,
                name=name,
                args=args,
                kwargs=kwargs,
                missed=missed,
                max_missed=max_missed,
                grace=grace,
            )
            return task

        return register

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered under `name`, or `UnknownTaskError`."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(
                f"unknown task {name!r}: no task of that name is registered on app "
                f"{self.name!r} (known: {known})"
            ) from None

    def send(self, envelopes: Sequence[Envelope]) -> None:
        """Encode and publish envelopes in one batch; returns once the broker stored them all.

        Middleware (`before_send`) may add headers to each on the way.
        """
        if envelopes:
            self.broker.publish(self._outgoing(self._before_send(envelopes)))

    async def send_async(self, envelopes: Sequence[Envelope]) -> None:
        """`send` for asyncio producers."""
        if envelopes:
            await self.broker.publish_async(self._outgoing(self._before_send(envelopes)))

    def _before_send(self, envelopes: Sequence[Envelope]) -> Sequence[Envelope]:
        """The envelopes with the headers middleware add. Not isolated: an exception reaches
        the sender, before anything was sent."""
        hooks = self.hooks.before_send
        if not hooks:
            return envelopes
        sent = []
        for given in envelopes:
            headers = dict(given.headers)
            for _, hook in hooks:
                hook(given, headers)
            if headers == given.headers:
                sent.append(given)
                continue
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                raise ConfigurationError(
                    f"task {given.task}: middleware added headers that are not strings "
                    "mapped to strings"
                )
            sent.append(msgspec.structs.replace(given, headers=headers))
        return sent

    def result(self, task_id: str) -> Result[Any]:
        """A handle on the result of any task id."""
        return Result(task_id, self.results, app=self)

    def close(self) -> None:
        """Close this process's resources, broker and store connections."""
        self.resources.close_all()
        if self._broker is not None:
            self._broker.close()
        if not isinstance(self._results, _Unset) and self._results is not None:
            self._results.close()
        if not isinstance(self._revocations, _Unset) and self._revocations is not None:
            self._revocations.close()

    def _outgoing(self, envelopes: Sequence[Envelope]) -> list[Outgoing]:
        limit, signer = self.settings.max_message_size, self.signer
        store = self.results
        to = None if store is None else store.reply_address()
        return [
            Outgoing(
                e.queue,
                encode(e, max_size=limit, signer=signer),
                e.priority,
                e.eta,
                self._reply_to(e, to),
            )
            for e in envelopes
        ]

    def _reply_to(self, envelope: Envelope, to: str | None) -> str | None:
        """The sender's address for a task's result records, if it takes them itself (RPC)."""
        if to is None:
            return None
        task = self.tasks.get(envelope.task)
        return None if task is not None and task.options.ignore_result else to

    def _results_url(self) -> str | None:
        settings = self.settings
        if settings.ignore_results:
            return None
        if settings.results is not None:
            return settings.results
        if settings.broker.startswith(("sqlite:", "memory:")):
            return settings.broker
        return None


def _default_name(fn: Callable[..., Any]) -> str:
    """`module.function`; a script run directly is named after its file, not `__main__`.

    `__mp_main__` is the same script re-imported by a spawned process: it gets the same name.
    """
    module = fn.__module__
    if module in ("__main__", "__mp_main__"):
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
        else:
            module = os.path.splitext(os.path.basename(getattr(main, "__file__", "main")))[0]
    return f"{module}.{fn.__qualname__}"


def load_app(path: str) -> Conveyor:
    """Import `module:attribute`, looking in the current directory first (as uvicorn does).

    A module elsewhere on `sys.path` (an installed package, or an editable install's source
    tree) is found only when the current directory has none of that name; `origin_outside_cwd`
    tells the caller when that happened.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"app path {path!r} must look like module:attribute, e.g. shop:app"
        )
    _put_cwd_first()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only when the app's own module (or a package above it) is missing; a missing
        # dependency imported by it is the user's to see as it is.
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(
                f"cannot import module {module_name!r} for app {path!r}: run from the directory "
                "that contains it, or install it"
            ) from None
        raise
    if not hasattr(module, attribute):
        raise ConfigurationError(
            f"module {module_name!r} has no attribute {attribute!r}: APP is module:attribute, "
            f"where attribute is your Conveyor(...) object"
        )
    app = getattr(module, attribute)
    if not isinstance(app, Conveyor):
        raise ConfigurationError(f"{path!r} is a {type(app).__name__}, not a Conveyor app")
    app.import_path = path
    return app


def origin_outside_cwd(app: Conveyor) -> Path | None:
    """The file `load_app` imported `app`'s module from, if it lies outside the current directory.

    None when the file is under the current directory, or when the app was not loaded by path
    or its module has no file. A module found elsewhere is usually an installed package, which
    is fine, but it can also be a same-named file in another project: then relative paths, such
    as the default `sqlite:///conveyor.db`, point to a different queue than the sender's.
    """
    if app.import_path is None:
        return None
    module = sys.modules.get(app.import_path.partition(":")[0])
    filename = getattr(module, "__file__", None)
    if not filename:
        return None
    # Not resolved: a symlink placed in the current directory is where the user meant to look.
    origin = Path(os.path.abspath(filename))
    return None if origin.is_relative_to(os.getcwd()) else origin


def _put_cwd_first() -> None:
    """Make the current directory the first place imports look, whatever else is on sys.path.

    A console script's sys.path starts with its own bin directory, not the current directory, and
    an editable install or PYTHONPATH can list another project's directory before it: without
    this, `tasks:app` could silently import another project's tasks.py.
    """
    cwd = os.getcwd()
    if sys.path[:1] not in ([cwd], [""]):
        sys.path.insert(0, cwd)


def import_path_of(app: Conveyor) -> str | None:
    """How a fresh interpreter can import `app` again: `module:attribute`, or None.

    The path `load_app` used, else the first module-level name bound to it (an app made inside a
    function, or in `__main__`, has none).
    """
    if app.import_path is not None:
        return app.import_path
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            if value is app:
                return f"{name}:{attribute}"
    return None
