"""The pipeline's task: decode a batch of BLE readings, publish each to its device's topic at QoS 2.

The MQTT connection is an `@app.resource`: each worker child creates its own on its first task
and keeps it for the tasks after, so a worker opens one connection per child, not one per task,
and never uses a socket its parent opened before forking (see `naive.py` for what that does).
The resource's check re-creates a connection that died.

A batch that fails on the way (the broker went away) is retried with backoff; the readings it
had already published are published again, so a subscriber may see duplicates, never a gap.

Configured from the environment, so a worker started on its own finds the same settings:

    BLE_MQTT_URL              the MQTT broker (default mqtt://127.0.0.1:1883)
    BLE_MQTT_PREFIX           readings go to PREFIX/MAC (default ble)
    BLE_MQTT_PUBLISH_TIMEOUT  seconds to wait for a PUBCOMP before retrying (default 10)
    CONVEYOR_BROKER           conveyor's broker (default sqlite:///ble_mqtt.db, in the working
                              directory)

    conveyor worker examples.ble_mqtt.tasks:app --pool prefork --max-tasks-per-child 20
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor import Conveyor
from conveyor.integrations.mqtt import MqttError, MqttPublisher
from examples.ble_mqtt.frames import MalformedFrame, Reading, decode

PUBLISH_BATCH = "ble_mqtt.publish_batch"
MQTT_URL = "mqtt://127.0.0.1:1883"

log = logging.getLogger("ble_mqtt")


@dataclass(frozen=True)
class Config:
    """Where the pipeline's tasks go and where its readings are published."""

    broker: str | None = None  # None: CONVEYOR_BROKER, else sqlite:///ble_mqtt.db
    mqtt_url: str = MQTT_URL
    prefix: str = "ble"
    publish_timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """The settings from `BLE_MQTT_*` variables (see the module's docstring)."""
        return cls(
            broker=env.get("CONVEYOR_BROKER") or "sqlite:///ble_mqtt.db",
            mqtt_url=env.get("BLE_MQTT_URL", MQTT_URL),
            prefix=env.get("BLE_MQTT_PREFIX", "ble"),
            publish_timeout=float(env.get("BLE_MQTT_PUBLISH_TIMEOUT", "10")),
        )


def publish_readings(
    readings: Iterable[object], prefix: str, publish: Callable[[str, bytes], object]
) -> dict[str, Any]:
    """Decode each reading and `publish(topic, payload)` the good ones to PREFIX/MAC.

    A malformed reading is counted, logged and skipped: it never stops the batch. Returns
    {"published": n, "malformed": n, "rejected": {reason: n}}.
    """
    published = 0
    rejected: Counter[str] = Counter()
    for raw in readings:
        try:
            reading = decode(Reading.from_dict(raw))
        except MalformedFrame as exc:
            rejected[exc.reason] += 1
            where = raw.get("id") if isinstance(raw, dict) else None
            log.info("reading %s rejected: %s", where, exc)
            continue
        publish(f"{prefix}/{reading['mac']}", json.dumps(reading).encode())
        published += 1
    return {"published": published, "malformed": rejected.total(), "rejected": dict(rejected)}


def create_app(config: Config) -> Conveyor:
    """The pipeline's app: its MQTT resource and its one task."""
    app = Conveyor("ble_mqtt", broker=config.broker)

    @app.resource(name="ble_mqtt.mqtt", check=lambda publisher: publisher.is_connected())
    def mqtt() -> MqttPublisher:
        return MqttPublisher(config.mqtt_url, publish_timeout=config.publish_timeout)

    # Backoff from 0.5 s doubling up to 5 s, with jitter, for up to 40 tries: a broker can be
    # away for a few minutes without a reading lost.
    @app.task(
        name=PUBLISH_BATCH,
        autoretry_for=(MqttError,),
        retry_backoff=0.5,
        retry_backoff_max=5.0,
        max_retries=40,
    )
    def publish_batch(readings: list[dict[str, Any]]) -> dict[str, Any]:
        """Publish a batch at QoS 2; what was published, rejected, and by which connection."""
        publisher = mqtt()

        def publish(topic: str, payload: bytes) -> None:
            publisher.publish(topic, payload, qos=2)

        report = publish_readings(readings, config.prefix, publish)
        return report | {
            "pid": os.getpid(),
            "client_id": publisher.client_id,
            "connections": publisher.connections,
        }

    return app


# For `conveyor worker examples.ble_mqtt.tasks:app`: the app as the environment configures it.
app = create_app(Config.from_env())
