"""The failure this example is about. Do not copy: one MQTT client, made when the module loads.

This is the "optimization" from the story behind `@app.resource`: instead of a connection per
task, one paho client at module level, connected at import, its network thread started. The
worker imports the module, so the client connects in the worker's process, and the children are
forked after that. A child gets a copy of the client object but not its network thread (threads
do not survive a fork) and no socket it may use: one socket shared by several processes would
interleave their packets on one MQTT session. In a pool that does not guard against this,
`publish` returns as if all were well and nothing reaches the broker (0 of 200 messages in the
story). conveyor points the sockets a child inherits at /dev/null, so here the first `publish`
in a child fails instead,
with `OSError: [Errno 88] Socket operation on non-socket` (paho waking its network thread):
louder, and still nothing delivered.

The worker sees the connection when it forks and logs a warning that names `@app.resource`.
`python -m examples.ble_mqtt run --naive` runs the pipeline with this module.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from conveyor import Conveyor
from examples.ble_mqtt.tasks import PUBLISH_BATCH, Config, publish_readings

_url = urlsplit(Config.from_env().mqtt_url)
client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ble-naive-{os.getpid()}")
client.connect(_url.hostname or "127.0.0.1", _url.port or 1883)
client.loop_start()


def create_app(config: Config) -> Conveyor:
    """The same pipeline as `tasks.create_app`, publishing through the module's client."""
    app = Conveyor("ble_mqtt_naive", broker=config.broker)

    # The time limit bounds a child stuck on a lock that the parent's network thread held at
    # the fork; the story's tasks had none, and nor does their failure need one.
    @app.task(name=PUBLISH_BATCH, time_limit=10)
    def publish_batch(readings: list[dict[str, Any]]) -> dict[str, Any]:
        """Publish a batch at QoS 2 through the module-level client."""

        def publish(topic: str, payload: bytes) -> None:
            client.publish(topic, payload, qos=2)  # for a network thread not in this process

        report = publish_readings(readings, config.prefix, publish)
        return report | {"pid": os.getpid(), "client_id": client._client_id.decode()}

    return app


def close() -> None:
    """Disconnect the module's client (in the process that made it)."""
    client.disconnect()
    client.loop_stop()
