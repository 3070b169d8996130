"""``run --check``'s judgement of what the broker says of the derived topic's message size."""

from __future__ import annotations

from agents.daemon_config import load_daemon_config
from agents.preflight import _message_size_check


def test_a_derived_topic_that_takes_smaller_messages_than_the_daemon_sends_is_a_warning(tmp_path):
    config = load_daemon_config({"agents": [{"kind": "rate", "name": "rate"}], "state_dir": str(tmp_path)})
    kafka_default = 1048588  # Kafka's default message.max.bytes
    warned = _message_size_check(kafka_default, config)
    assert warned.status == "warn" and "takes messages up to 1.0 MiB" in warned.detail
    assert "max_message_bytes is 16.0 MiB" in warned.detail and "kept in state_dir/refused" in warned.detail
    assert _message_size_check(32 * 2**20, config).status == "ok"
    assert _message_size_check(None, config) is None  # the broker does not say: nothing claimed
