"""Values arrive exactly, or not at all: what a task's arguments and results may be.

A value crosses a broker as JSON. Where the task's signature says nothing about it (no
annotation, `Any` or `object`), it must be plain JSON already: `str`, `int`, finite `float`,
`bool`, `None`, and `list`s and `dict`s with `str` keys of those, of exactly those types.
Anything else would arrive changed (a tuple or a set as a list, bytes as base64 text, a datetime
as a string, an `IntEnum` as an int, `{1: "a"}` with the key `"1"`), so the send refuses it
with `EncodeError`, naming where it is and what to do.

Where a parameter (or the return value) is annotated, msgspec converts: the sender checks that
the value goes through JSON and the annotation back to an equal value, and the worker converts
what it receives to the annotated type (`datetime`, `UUID`, `Decimal`, `bytes`, `set`,
`tuple`, enums, dataclasses, msgspec Structs, pydantic models when pydantic is installed, and
containers of them). An argument that does not fit its annotation is refused at the sender with
`ArgumentError`, and dead-lettered as `bad arguments` if it reaches a worker anyway.

Annotations are read once per task, the first time they are needed; one that cannot be resolved
at run time (a name imported only under `TYPE_CHECKING`) counts as no annotation.
"""

from __future__ import annotations

import inspect
import math
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from conveyor.errors import ArgumentError, EncodeError

_SCALARS = (str, int, bool, type(None))
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, NotImplementedError)


def _pydantic_model() -> type | None:
    """pydantic's BaseModel if the process has imported pydantic (conveyor never imports it)."""
    model = getattr(sys.modules.get("pydantic"), "BaseModel", None)
    return model if isinstance(model, type) else None


def enc_hook(value: Any) -> Any:
    """How msgspec encodes what it does not know: a pydantic model, as its JSON form."""
    model = _pydantic_model()
    if model is not None and isinstance(value, model):
        return value.model_dump(mode="json")  # type: ignore[attr-defined]
    raise NotImplementedError(f"objects of type {type(value).__name__} are not supported")


def dec_hook(kind: type, value: Any) -> Any:
    """How msgspec builds what it does not know: a pydantic model, validated by pydantic."""
    model = _pydantic_model()
    if model is not None and isinstance(kind, type) and issubclass(kind, model):
        return kind.model_validate(value)  # type: ignore[attr-defined]
    raise NotImplementedError(f"type {kind!r} is not supported")


#: Encodes envelopes and results: msgspec's own types, plus pydantic models.
encoder = msgspec.json.Encoder(enc_hook=enc_hook)


def check_plain(value: Any, where: str) -> None:
    """Raise `EncodeError` unless `value` is plain JSON, of exactly the JSON types.

    A loop over a stack, not recursion: any nesting the decoder accepts is checked.
    """
    if type(value) in _SCALARS:
        return
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is float:
            if not math.isfinite(item):
                raise EncodeError(f"{path}: {item!r} has no JSON form (NaN and infinities)")
        elif kind is list:
            stack.extend((v, f"{path}[{n}]") for n, v in enumerate(item))
        elif kind is dict:
            for key, v in item.items():
                if type(key) is not str:
                    raise EncodeError(
                        f"{path}: the key {key!r} would arrive as the string {str(key)!r} "
                        "(JSON keys are strings); use str keys, or annotate the parameter as "
                        f"dict[{type(key).__name__}, ...]"
                    )
                stack.append((v, f"{path}[{key!r}]"))
        else:
            raise EncodeError(f"{path}: {_arrival(item)}; {_HINT}")


_HINT = (
    "annotate the parameter (or the return type) with its type, or pass plain JSON (str, int, "
    "float, bool, None, and lists and dicts with str keys of those)"
)


def _arrival(value: Any) -> str:
    """What becomes of a value that is not plain JSON, in words."""
    name = type(value).__name__
    try:
        arrived = msgspec.json.decode(encoder.encode(value))
    except _ENCODE_ERRORS:
        return f"a {name} cannot be encoded as JSON"
    return f"a {name} would arrive as a {type(arrived).__name__}, not as sent"


class Types:
    """The annotations a task's values are converted by: its parameters' and its return's.

    Read on first use (the module that defines an annotation's type may still be loading when
    the task is declared).
    """

    __slots__ = ("_params", "_returns", "fn", "shape", "signature")

    def __init__(self, fn: Callable[..., Any], signature: inspect.Signature) -> None:
        self.fn = fn
        self.signature = signature
        self.shape = _Shape(signature)
        self._params: dict[str, Any] | None = None
        self._returns: Any = None

    @property
    def params(self) -> dict[str, Any]:
        """Parameter name -> the type its value converts to, for the annotated ones."""
        if self._params is None:
            self._read()
        assert self._params is not None
        return self._params

    @property
    def returns(self) -> Any:
        """The type the return value converts to, or None without an annotation."""
        if self._params is None:
            self._read()
        return self._returns

    def _read(self) -> None:
        hints = _resolve(self.fn)
        params = {}
        for name, parameter in self.signature.parameters.items():
            hint = hints.get(name, inspect.Parameter.empty)
            if not _untyped(hint):
                params[name] = _element(parameter.kind, hint)
        returns = hints.get("return", inspect.Parameter.empty)
        self._returns = None if _untyped(returns) else returns
        self._params = params


class _Shape:
    """A signature's parameters, laid out to check a call against it without `Signature.bind`
    (which costs microseconds per message); `bind` still words the error when a call does not
    fit."""

    __slots__ = ("index", "keyword", "names", "required", "var_args", "var_kwargs")

    def __init__(self, signature: inspect.Signature) -> None:
        kinds = inspect.Parameter
        params = list(signature.parameters.values())
        positional = [
            p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        ]
        self.names = tuple(p.name for p in positional)
        self.index = {p.name: n for n, p in enumerate(positional)}
        # Names a keyword argument may use.
        self.keyword = frozenset(
            p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        )
        self.required = tuple(
            p.name
            for p in params
            if p.default is kinds.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        )
        self.var_args = next((p.name for p in params if p.kind is kinds.VAR_POSITIONAL), None)
        self.var_kwargs = next((p.name for p in params if p.kind is kinds.VAR_KEYWORD), None)

    def fits(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """True if a call with these arguments binds to the signature."""
        given = len(args)
        if given > len(self.names) and self.var_args is None:
            return False
        positions = self.index
        for key in kwargs:
            if key in self.keyword:
                if positions.get(key, given) < given:
                    return False  # given twice
            elif self.var_kwargs is None:
                return False
        return all(name in kwargs or positions.get(name, given) < given for name in self.required)

    def value(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """The value a fitting call gives parameter `name` (a `_MISSING` default if none)."""
        index = self.index.get(name)
        if index is not None and index < len(args):
            return args[index]
        if name == self.var_args:
            return tuple(args[len(self.names) :])
        if name == self.var_kwargs:
            return {k: v for k, v in kwargs.items() if k not in self.keyword}
        return kwargs.get(name, _MISSING)


_MISSING = object()


def _resolve(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations as objects; one that does not resolve counts as none."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        pass
    hints: dict[str, Any] = {}
    namespace = getattr(fn, "__globals__", {})
    for name, raw in inspect.get_annotations(fn).items():
        try:  # the function's own annotation, in the function's own module
            hints[name] = eval(raw, namespace) if isinstance(raw, str) else raw
        except Exception:
            continue  # a name imported under TYPE_CHECKING only, say
    return hints


def _untyped(hint: Any) -> bool:
    """True for no annotation, `Any`, `object`, and a name left unresolved."""
    return (
        hint is inspect.Parameter.empty
        or hint is Any
        or hint is object
        or isinstance(hint, str | typing.ForwardRef)
    )


def _element(kind: inspect._ParameterKind, hint: Any) -> Any:
    """What `*args: T` and `**kwargs: T` annotate: each element."""
    if kind is inspect.Parameter.VAR_POSITIONAL:
        return tuple[hint, ...]
    if kind is inspect.Parameter.VAR_KEYWORD:
        return dict[str, hint]
    return hint


def _require_fit(types: Types, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """`ArgumentError` unless the call fits the signature, in `Signature.bind`'s words."""
    if not types.shape.fits(args, kwargs):
        try:
            types.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ArgumentError(str(exc)) from None
        raise ArgumentError("the arguments do not fit the task's signature")  # pragma: no cover


def check_arguments(types: Types, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse at the sender what would not arrive as sent (`EncodeError`) or does not fit the
    signature or an annotation (`ArgumentError`)."""
    shape = types.shape
    _require_fit(types, args, kwargs)
    params = types.params
    for name, hint in params.items():
        value = shape.value(name, args, kwargs)
        if value is not _MISSING:
            _check_typed(value, hint, f"argument {name!r}", ArgumentError)
    names = shape.names
    for n, value in enumerate(args):
        if n < len(names):
            if names[n] not in params:
                check_plain(value, f"argument {names[n]!r}")
        elif shape.var_args not in params:  # the call's own tuple: its items count
            check_plain(value, f"argument {shape.var_args!r}[{n - len(names)}]")
    for key, value in kwargs.items():
        if key not in params and (key in shape.keyword or shape.var_kwargs not in params):
            check_plain(value, f"argument {key!r}")


def _check_typed(value: Any, hint: Any, where: str, error: type[Exception]) -> bytes:
    """The value's JSON, once it went through JSON and the annotation back to an equal value."""
    try:
        wire = encoder.encode(value)
    except _ENCODE_ERRORS as exc:
        raise EncodeError(f"{where}: a {type(value).__name__} cannot be encoded ({exc})") from None
    try:
        back = msgspec.json.decode(wire, type=hint, dec_hook=dec_hook)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise error(f"{where} does not fit its annotation {_name(hint)}: {exc}") from None
    if not _equal(back, value):
        raise EncodeError(
            f"{where}: a {type(value).__name__} would arrive changed as {_name(hint)} "
            f"({back!r} instead of {value!r}); annotate it with its own type, or pass plain JSON"
        )
    return wire


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a type whose == raises or is ambiguous (an array, say)
        return False


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


def convert_arguments(
    types: Types, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[Sequence[Any], Mapping[str, Any]]:
    """The arguments as received, converted to the task's annotations (the worker's side).

    `ArgumentError` if they do not fit the signature or an annotation. Without annotations the
    arguments come back as they are.
    """
    shape = types.shape
    _require_fit(types, args, kwargs)
    params = types.params
    if not params:
        return args, kwargs
    converted_args, converted_kwargs = list(args), dict(kwargs)
    for name, hint in params.items():
        value = shape.value(name, args, kwargs)
        if value is _MISSING:
            continue  # left to its default
        try:
            value = msgspec.convert(value, hint, str_keys=True, dec_hook=dec_hook)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise ArgumentError(
                f"argument {name!r} does not fit its annotation {_name(hint)}: {exc}"
            ) from None
        index = shape.index.get(name)
        if index is not None and index < len(args):
            converted_args[index] = value
        elif name == shape.var_args:
            converted_args[len(shape.names) :] = value
        elif name == shape.var_kwargs:
            converted_kwargs.update(value)
        else:
            converted_kwargs[name] = value
    return converted_args, converted_kwargs


def encode_result(value: Any, types: Types) -> bytes:
    """The JSON of a task's return value; `EncodeError` if it would not come back as it was."""
    hint = types.returns
    if hint is not None:
        return _check_typed(value, hint, "the return value", EncodeError)
    check_plain(value, "the return value")
    try:
        return encoder.encode(value)
    except _ENCODE_ERRORS as exc:
        raise EncodeError(f"the return value cannot be encoded as JSON: {exc}") from None


def decode_result(data: bytes, hint: Any) -> Any:
    """A stored result, as the task's return annotation says (plain JSON without one)."""
    if hint is None:
        return msgspec.json.decode(data)
    return msgspec.json.decode(data, type=hint, dec_hook=dec_hook)
