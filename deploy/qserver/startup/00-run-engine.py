"""RE Manager startup, step 1: the RunEngine, and its documents to Kafka when a broker is named.

The queueserver loads every ``*.py`` here in name order into one namespace. Names that start
with ``_`` are helpers: the permissions forbid them as plans or devices.

Environment
-----------
BEAMPILOT_KAFKA_BOOTSTRAP
    ``host:port[,host:port]`` of a Kafka-compatible broker; unset: documents stay in-process.
BEAMPILOT_KAFKA_TOPIC
    Topic the documents go to (default ``beampilot.raw``), in bluesky-kafka's wire format
    (msgpack with msgpack-numpy), which is what ``streams`` reads.
"""

import os as _os

from bluesky import RunEngine as _RunEngine

# The manager runs the RunEngine in its worker's main thread; no Ctrl-C handler is wanted there.
RE = _RunEngine({}, context_managers=[])

if _os.environ.get("BEAMPILOT_KAFKA_BOOTSTRAP"):
    from bluesky_kafka import Publisher as _Publisher

    _kafka_publisher = _Publisher(
        topic=_os.environ.get("BEAMPILOT_KAFKA_TOPIC", "beampilot.raw"),
        bootstrap_servers=_os.environ["BEAMPILOT_KAFKA_BOOTSTRAP"],
        key="beampilot-qserver",
        # a consumer steering the next point must see the stop document now, not at linger.ms
        flush_on_stop_doc=True,
    )
    RE.subscribe(_kafka_publisher)
