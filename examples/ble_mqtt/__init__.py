"""BLE beacon readings published to MQTT from prefork workers, one connection per child.

`frames` builds and decodes the advertisements, `tasks` publishes them, `subscriber` counts what
arrives, `naive` is the failure this example is about, and `python -m examples.ble_mqtt run`
puts it all together. README.md in this folder explains it.
"""
