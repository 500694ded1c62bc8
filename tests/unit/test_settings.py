"""Settings: keyword arguments, then CONVEYOR_* variables, then defaults; typed and checked."""

from __future__ import annotations

import pytest

from conveyor import Conveyor, Settings
from conveyor.errors import ConfigurationError

NO_ENV: dict[str, str] = {}


def test_defaults() -> None:
    s = Settings.load(env=NO_ENV)
    assert s.broker == "sqlite:///conveyor.db"
    assert s.results is None
    assert s.ignore_results is False
    assert s.default_queue == "default"
    assert s.result_expires == 86_400.0
    assert s.visibility_timeout == 60.0
    assert s.max_message_size == 16 * 1024 * 1024
    assert s.poison_limit == 3
    assert s.default_max_retries == 3
    assert s.default_retry_backoff_max == 600.0
    assert s.concurrency >= 1
    assert s.pool == "prefork"
    assert s.shutdown_grace == 30.0
    assert s.log_level == "INFO"


def test_env_beats_defaults() -> None:
    s = Settings.load(env={"CONVEYOR_DEFAULT_QUEUE": "images", "CONVEYOR_POOL": "solo"})
    assert s.default_queue == "images"
    assert s.pool == "solo"
    assert s.broker == "sqlite:///conveyor.db"  # untouched ones keep their defaults


def test_keyword_beats_env() -> None:
    env = {"CONVEYOR_DEFAULT_QUEUE": "from-env", "CONVEYOR_VISIBILITY_TIMEOUT": "5"}
    s = Settings.load(env=env, default_queue="from-kwarg")
    assert s.default_queue == "from-kwarg"
    assert s.visibility_timeout == 5.0  # env still applies where no keyword was given


def test_keyword_none_falls_back_to_env() -> None:
    s = Settings.load(env={"CONVEYOR_BROKER": "memory://"}, broker=None)
    assert s.broker == "memory://"


def test_env_keys_need_the_prefix_and_upper_case() -> None:
    env = {"DEFAULT_QUEUE": "x", "conveyor_default_queue": "y", "CONVEYOR_default_queue": "z"}
    assert Settings.load(env=env).default_queue == "default"


@pytest.mark.parametrize(
    ("variable", "text", "field", "expected"),
    [
        ("CONVEYOR_VISIBILITY_TIMEOUT", "30", "visibility_timeout", 30.0),
        ("CONVEYOR_VISIBILITY_TIMEOUT", "0.25", "visibility_timeout", 0.25),
        ("CONVEYOR_RESULT_EXPIRES", "3600", "result_expires", 3600.0),
        ("CONVEYOR_MAX_MESSAGE_SIZE", "1024", "max_message_size", 1024),
        ("CONVEYOR_CONCURRENCY", "7", "concurrency", 7),
        ("CONVEYOR_POISON_LIMIT", "5", "poison_limit", 5),
        ("CONVEYOR_DEFAULT_MAX_RETRIES", "0", "default_max_retries", 0),
        ("CONVEYOR_SHUTDOWN_GRACE", "0", "shutdown_grace", 0.0),
        ("CONVEYOR_IGNORE_RESULTS", "true", "ignore_results", True),
        ("CONVEYOR_IGNORE_RESULTS", "1", "ignore_results", True),
        ("CONVEYOR_IGNORE_RESULTS", "false", "ignore_results", False),
        ("CONVEYOR_IGNORE_RESULTS", "0", "ignore_results", False),
        ("CONVEYOR_RESULTS", "memory://", "results", "memory://"),
        ("CONVEYOR_RESULTS", "", "results", None),
        ("CONVEYOR_LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
    ],
)
def test_env_strings_become_typed_values(
    variable: str, text: str, field: str, expected: object
) -> None:
    value = getattr(Settings.load(env={variable: text}), field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("visibilty_timeout", "visibility_timeout"),
        ("concurency", "concurrency"),
        ("default_que", "default_queue"),
        ("result_expire", "result_expires"),
    ],
)
def test_unknown_setting_has_a_did_you_mean_hint(typo: str, meant: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(env=NO_ENV, **{typo: 1})
    message = str(info.value)
    assert repr(typo) in message
    assert f"did you mean {meant!r}" in message


def test_unknown_setting_without_close_match_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(env=NO_ENV, zzzzzzzz=1)
    message = str(info.value)
    assert "did you mean" not in message
    assert "visibility_timeout" in message


def test_unknown_setting_is_rejected_by_the_app_too() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'poison_limit'"):
        Conveyor("x", broker="memory://", poison_limt=2)


@pytest.mark.parametrize(
    ("source", "field", "value"),
    [
        ("kwarg", "visibility_timeout", 0),
        ("kwarg", "visibility_timeout", -1.0),
        ("kwarg", "result_expires", 0),
        ("kwarg", "max_message_size", 0),
        ("kwarg", "poison_limit", 0),
        ("kwarg", "default_max_retries", -1),
        ("kwarg", "concurrency", 0),
        ("kwarg", "concurrency", True),
        ("kwarg", "shutdown_grace", -0.5),
        ("kwarg", "ignore_results", "maybe"),
        ("kwarg", "default_queue", 5),
        ("env", "visibility_timeout", "soon"),
        ("env", "visibility_timeout", "0"),
        ("env", "concurrency", "four"),
        ("env", "concurrency", "2.5"),
        ("env", "max_message_size", "-1"),
        ("env", "ignore_results", "yes please"),
    ],
)
def test_invalid_values_raise_configuration_error(source: str, field: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        if source == "env":
            Settings.load(env={f"CONVEYOR_{field.upper()}": str(value)})
        else:
            Settings.load(env=NO_ENV, **{field: value})
    assert field in str(info.value)


@pytest.mark.parametrize("source", ["kwarg", "env"])
def test_unknown_pool_name_is_rejected_when_settings_load(source: str) -> None:
    with pytest.raises(ConfigurationError, match="pool"):
        if source == "env":
            Settings.load(env={"CONVEYOR_POOL": "bogus"})
        else:
            Settings.load(env=NO_ENV, pool="bogus")


def test_settings_are_frozen() -> None:
    s = Settings.load(env=NO_ENV)
    with pytest.raises(AttributeError):
        s.pool = "solo"  # type: ignore[misc]


def test_app_passes_keywords_into_its_settings() -> None:
    app = Conveyor("x", broker="memory://", visibility_timeout=5, default_queue="q")
    assert app.settings.visibility_timeout == 5.0
    assert app.settings.default_queue == "q"
    assert app.settings.broker == "memory://"


def test_app_with_results_none_ignores_results() -> None:
    app = Conveyor("x", broker="memory://", results=None)
    assert app.settings.ignore_results is True
    assert app.results is None
