"""Event-model documents over Kafka, on kafka-python, wire-compatible with bluesky-kafka.

A message's value is ``msgpack((name, doc))`` with numpy arrays and scalars encoded the
``msgpack_numpy`` way, exactly the bytes bluesky-kafka's ``Publisher`` sends (it patches
``msgpack`` globally with ``msgpack_numpy.patch()``; this module passes the hooks explicitly and
never patches). Every message of a :class:`KafkaDocumentSink` carries one fixed key, as the
``Publisher``'s do, so a run stays in one partition and in order. Topics are named
``<beamline>.bluesky.runengine.documents`` (:func:`document_topic`).

:class:`KafkaDocumentSource` reads with manually *assigned* partitions: joining a consumer group
costs seconds (about 20 s against tansu with kafka-python's defaults) and a document stream has
one reader per agent. With a ``group_id`` it still assigns, and :meth:`KafkaDocumentSource.commit`
stores offsets in that group. A message that is not a document comes back as a :class:`Record`
with ``error`` set and its offset, never as an exception, and the stream goes on.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack_numpy as mpn
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from streams.errors import DocumentError, StreamError
from streams.lifecycle import ClosesOnExit

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas at import with importlib.resources.read_text,
    # deprecated since Python 3.11; harmless, and out of our hands.
    warnings.filterwarnings("ignore", "(read|open)_text is deprecated", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient
    from kafka.errors import (
        KafkaError,
        MessageSizeTooLargeError,
        OffsetOutOfRangeError,
        RecordListTooLargeError,
        TopicAlreadyExistsError,
    )
    from kafka.partitioner.default import murmur2
    from kafka.structs import OffsetAndMetadata

try:
    # The C extension's own names: msgpack_numpy.patch() (which bluesky_kafka runs on import)
    # replaces msgpack.packb/unpackb with wrappers that call msgpack_numpy.decode first, and that
    # unpickles object arrays; these keep working as plain msgpack whatever was imported first.
    from msgpack._cmsgpack import Packer as _Packer
    from msgpack._cmsgpack import unpackb as _unpackb
except ImportError:  # a pure-Python msgpack build
    from msgpack.fallback import Packer as _Packer
    from msgpack.fallback import unpackb as _unpackb

__all__ = [
    "DOCUMENT_NAMES",
    "KafkaDocumentSink",
    "KafkaDocumentSource",
    "KafkaSettings",
    "OffsetReset",
    "Record",
    "RefusedDocument",
    "check_topic_name",
    "document_topic",
    "pack",
    "unpack",
]

logger = logging.getLogger(__name__)

DOCUMENT_NAMES = frozenset(
    {
        "start",
        "descriptor",
        "event",
        "event_page",
        "stop",
        "resource",
        "datum",
        "datum_page",
        "stream_resource",
        "stream_datum",
    }
)
_MiB = 1024 * 1024
_DEFAULT_MAX_MESSAGE = 8 * _MiB
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
# How often the source looks for topics that do not exist yet, and checks its connection.
_DISCOVERY_S = 0.5
_HEALTH_S = 0.25
# Back-off after a failed poll: doubles from the first value up to the cap.
_BACKOFF_S = (0.05, 2.0)
# kafka-python's own reconnect back-off (exponential, with jitter), capped at this.
_RECONNECT_MAX_MS = 2000


# -- codec -----------------------------------------------------------------------------------


class _PickledArrayError(Exception):
    """Raised inside msgpack's object hook: an object-dtype array would be unpickled."""


def _decode_hook(obj: dict[Any, Any]) -> Any:
    # msgpack_numpy stores object-dtype arrays as pickles; unpickling a message from the
    # network could run arbitrary code, so those are refused (event-model data never needs them).
    if b"nd" in obj or b"complex" in obj:
        if obj.get(b"kind") == b"O":
            raise _PickledArrayError
        return mpn.decode(obj)
    return obj


def pack(name: str, doc: Mapping[str, Any]) -> bytes:
    """Serialize a document the way bluesky-kafka's ``Publisher`` does.

    Parameters
    ----------
    name : str
        Document name, one of :data:`DOCUMENT_NAMES`.
    doc : Mapping
        The document; numpy arrays and scalars in it are encoded as ``msgpack_numpy`` does.

    Returns
    -------
    bytes
        ``msgpack((name, doc))``, byte-identical to bluesky-kafka's serializer.

    Raises
    ------
    DocumentError
        If ``name`` is unknown, ``doc`` is not a mapping, or a value cannot be serialized.
    """
    uid = doc.get("uid") if isinstance(doc, Mapping) else None
    uid = uid if isinstance(uid, str) else None
    if name not in DOCUMENT_NAMES:
        known = sorted(DOCUMENT_NAMES)
        raise DocumentError(str(name), uid, f"unknown document name; expected one of {known}")
    if not isinstance(doc, Mapping):
        raise DocumentError(name, None, f"doc must be a mapping, got {type(doc).__name__}")
    try:
        packed: bytes = _Packer(default=mpn.encode).pack((name, doc))
        return packed
    except (TypeError, ValueError, OverflowError) as err:
        raise DocumentError(name, uid, f"cannot serialize with msgpack: {err}") from None


def _decode(value: bytes) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """``(name, doc, None)`` for a document, ``(None, None, reason)`` for anything else."""
    try:
        obj = _unpackb(value, object_hook=_decode_hook)
    except _PickledArrayError:
        return None, None, "refused a pickled (object-dtype) numpy array: unpickling is unsafe"
    # Whatever the bytes make msgpack or msgpack_numpy raise is that one message's fault.
    except Exception as err:  # noqa: BLE001
        return None, None, f"not msgpack ({type(err).__name__}: {err})"
    if type(obj) is not list or len(obj) != 2:
        what = f"a list of {len(obj)}" if type(obj) is list else type(obj).__name__
        return None, None, f"not a (name, doc) pair: got {what}"
    name, doc = obj
    if type(name) is not str or name not in DOCUMENT_NAMES:
        known = sorted(DOCUMENT_NAMES)
        return None, None, f"unknown document name {name!r}; expected one of {known}"
    if type(doc) is not dict:
        return None, None, f"{name!r} doc is not a dict: got {type(doc).__name__}"
    return name, doc, None


def unpack(value: bytes) -> tuple[str, dict[str, Any]]:
    """Deserialize a message written by bluesky-kafka or by :func:`pack`.

    Raises
    ------
    DocumentError
        If ``value`` is not msgpack, not a ``(name, doc)`` pair, names an unknown document, or
        its doc is not a dict; the reason says which.
    """
    if not isinstance(value, bytes | bytearray | memoryview):
        kind = type(value).__name__
        raise DocumentError("unknown", None, f"a message value is bytes, not {kind}")
    name, doc, error = _decode(value)
    if name is None or doc is None:
        raise DocumentError("unknown", None, error or "undecodable")
    return name, doc


def check_topic_name(topic: str) -> str:
    """Return ``topic`` if it is a legal Kafka topic name, else raise ``ValueError``."""
    if not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic) or topic in {".", ".."}:
        raise ValueError(
            f"{topic=} is not a Kafka topic name: use 1-249 ASCII letters, digits, '.', '_', '-'"
        )
    return topic


def document_topic(beamline: str) -> str:
    """The bluesky-kafka topic of a beamline: ``<beamline>.bluesky.runengine.documents``."""
    if not isinstance(beamline, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", beamline):
        raise ValueError(f"{beamline=} must be non-empty ASCII letters, digits, '_' or '-'")
    return f"{beamline}.bluesky.runengine.documents"


# -- settings --------------------------------------------------------------------------------

_ROLE_KEYS: dict[str, frozenset[str]] = {
    "consumer": frozenset(KafkaConsumer.DEFAULT_CONFIG),
    "producer": frozenset(KafkaProducer.DEFAULT_CONFIG),
    "admin": frozenset(KafkaAdminClient.DEFAULT_CONFIG),
}
# Keys the source and sink own: serialization, offsets and grouping are their job.
_OWNED_KEYS = frozenset(
    {
        "key_serializer",
        "value_serializer",
        "key_deserializer",
        "value_deserializer",
        "group_id",
        "enable_auto_commit",
        "auto_offset_reset",
        "bootstrap_timeout_ms",
        "kafka_client",
    }
)


_SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]


class KafkaSettings(BaseModel):
    """How to reach a Kafka cluster: the ``kafka`` section of a config file.

    Parameters
    ----------
    bootstrap_servers : str
        ``"host:port"`` or ``"host1:port1,host2:port2"``.
    client_id : str
        Name the broker logs for this client.
    security_protocol, sasl_mechanism, sasl_plain_username, sasl_plain_password
        As in kafka-python; SASL protocols need a mechanism, PLAIN/SCRAM a user and password.
    ssl_cafile, ssl_certfile, ssl_keyfile : str, optional
        PEM files; each must exist when the settings load.
    request_timeout_ms : int
        Timeout of one broker request, and of connecting at startup.
    extra : dict
        Further kafka-python options (e.g. ``fetch_max_wait_ms``, ``linger_ms``,
        ``check_crcs``); each goes only to the clients that accept it.

    Examples
    --------
    >>> KafkaSettings(bootstrap_servers="127.0.0.1:9092").client_kwargs()["bootstrap_servers"]
    ['127.0.0.1:9092']
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "beampilot"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: _SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_ms: int = Field(default=10_000, ge=1_000, le=600_000)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: str) -> str:
        for item in value.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"bootstrap_servers={value!r}: {item!r} is not host:port; write "
                    "'host:port' or 'host1:port1,host2:port2'"
                )
        return ",".join(item.strip() for item in value.split(","))

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol={self.security_protocol!r} needs sasl_mechanism")
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                f"sasl_mechanism={self.sasl_mechanism!r} needs security_protocol SASL_PLAINTEXT "
                f"or SASL_SSL, not {self.security_protocol!r}"
            )
        if self.sasl_mechanism in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"} and (
            not self.sasl_plain_username or self.sasl_plain_password is None
        ):
            raise ValueError(
                f"sasl_mechanism={self.sasl_mechanism!r} needs sasl_plain_username and "
                "sasl_plain_password"
            )
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{key}={path!r} is not a file; fix the path or remove {key}")
        known = frozenset().union(*_ROLE_KEYS.values())
        for key in self.extra:
            if key in type(self).model_fields:
                raise ValueError(f"extra[{key!r}]: set {key} directly, not inside extra")
            if key in _OWNED_KEYS:
                raise ValueError(f"extra[{key!r}] is set by the source/sink itself; remove it")
            if key not in known:
                raise ValueError(f"extra[{key!r}] is not a kafka-python client option")
        return self

    def client_kwargs(
        self, role: Literal["consumer", "producer", "admin"] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for a kafka-python client.

        Parameters
        ----------
        role : {"consumer", "producer", "admin"}, optional
            Keep only the ``extra`` options that client accepts; all of them when None.
        """
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_plain_username is not None:
            kwargs["sasl_plain_username"] = self.sasl_plain_username
        if self.sasl_plain_password is not None:
            kwargs["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        allowed = _ROLE_KEYS[role] if role is not None else None
        kwargs.update(
            (k, v) for k, v in self.extra.items() if allowed is None or k in allowed
        )
        return kwargs

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast unless a broker answers at ``bootstrap_servers``.

        First a plain TCP connection to each address (for a precise reason), then a full
        kafka-python bootstrap through the first one that connects (TLS/SASL included).

        Raises
        ------
        StreamError
            Naming each address and why it failed, e.g. ``cannot reach Kafka at 127.0.0.1:9
            (connection refused); start the broker or fix kafka.bootstrap_servers``.
        """
        deadline = time.monotonic() + timeout
        _check_tcp(self.bootstrap_servers.split(","), timeout)
        remaining_ms = max(100, int((deadline - time.monotonic()) * 1000))
        kwargs = {**self.client_kwargs("consumer"), "bootstrap_timeout_ms": remaining_ms, "enable_auto_commit": False}
        try:
            consumer = _construct(KafkaConsumer, kwargs)
        except KafkaError as err:
            raise StreamError(
                f"{self.bootstrap_servers} accepts TCP connections but did not complete a Kafka "
                f"handshake within {timeout} s ({type(err).__name__}: {err}); check that it is a "
                "Kafka broker and that security_protocol, sasl_* and ssl_* match it"
            ) from err
        consumer.close(autocommit=False)

    def topic_partitions(self, topics: Sequence[str], timeout: float = 5.0) -> dict[str, int | None]:
        """How many partitions each of ``topics`` has (``None``: it does not exist), asked
        without creating any (a broker that auto-creates topics would make a missing one with
        its default partition count at the first read or write).

        Raises
        ------
        StreamError
            No broker answered (as :meth:`check_reachable`).
        """
        admin = self._admin(timeout)
        try:
            existing = set(admin.list_topics())  # all topics' metadata: creates nothing
            found = [t for t in topics if t in existing]
            described = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(found)} if found else {}
        except KafkaError as err:
            raise StreamError(f"cannot ask {self.bootstrap_servers} for its topics: {type(err).__name__}: {err}") from err
        finally:
            admin.close()
        return {t: described.get(t) for t in topics}

    def _admin(self, timeout: float) -> Any:
        """An admin client, once a broker is known to answer (:meth:`check_reachable`)."""
        self.check_reachable(timeout)
        kwargs = {**self.client_kwargs("admin"), "bootstrap_timeout_ms": max(100, int(timeout * 1000))}
        try:
            return _construct(KafkaAdminClient, kwargs)
        except KafkaError as err:
            raise StreamError(f"cannot ask {self.bootstrap_servers} for its topics: {type(err).__name__}: {err}") from err

    def message_size_limit(self, topic: str, timeout: float = 5.0) -> int | None:
        """The largest message the broker takes on ``topic``: the topic's ``max.message.bytes``
        (its own setting or the broker's default, as the broker describes it); ``None`` where the
        broker does not say (tansu describes no configs) or the topic does not exist.

        Raises
        ------
        StreamError
            No broker answered.
        """
        from kafka.admin import ConfigResource, ConfigResourceType

        admin = self._admin(timeout)
        try:
            described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
        except KafkaError:
            return None  # a broker that will not describe its configs: not known
        finally:
            admin.close()
        return topic_max_message_bytes(described, topic)

    def retained_messages(self, topic: str, timeout: float = 5.0) -> int:
        """How many messages ``topic`` holds now (its partitions' end offsets less their first
        retained ones): what a consumer reading it from the beginning would read. The topic must
        exist (see :meth:`topic_partitions`); it is not created.

        Raises
        ------
        StreamError
            No broker answered, or it would not say.
        """
        from kafka import TopicPartition

        kwargs = {**self.client_kwargs("consumer"), "bootstrap_timeout_ms": max(100, int(timeout * 1000)),
                  "allow_auto_create_topics": False, "enable_auto_commit": False}
        try:
            consumer = _construct(KafkaConsumer, kwargs)
        except KafkaError as err:
            raise StreamError(f"cannot ask {self.bootstrap_servers} about {topic!r}: {type(err).__name__}: {err}") from err
        try:
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            ms = max(100, int(timeout * 1000))
            firsts, ends = consumer.beginning_offsets(parts, timeout_ms=ms), consumer.end_offsets(parts, timeout_ms=ms)
        except KafkaError as err:
            raise StreamError(f"cannot ask {self.bootstrap_servers} about {topic!r}: {type(err).__name__}: {err}") from err
        finally:
            consumer.close(autocommit=False)
        return int(sum(ends[p] - firsts[p] for p in parts))


def _check_tcp(servers: Sequence[str], timeout: float) -> None:
    """Raise unless some ``host:port`` of ``servers`` accepts a TCP connection.

    Checked before a kafka-python client starts, which would otherwise retry a refused port
    until its bootstrap timeout (and leave a socket unclosed per attempt).
    """
    deadline = time.monotonic() + timeout
    reasons = []
    for item in servers:
        host, _, port = item.strip().rpartition(":")
        reason = _tcp_failure(host, int(port), max(0.05, deadline - time.monotonic()))
        if reason is None:
            return
        reasons.append(f"{item} ({reason})")
    raise StreamError(
        f"cannot reach Kafka at {', '.join(reasons)}; start the broker or fix "
        "kafka.bootstrap_servers"
    )


def _tcp_failure(host: str, port: int, timeout: float) -> str | None:
    """None if ``host:port`` accepts a TCP connection, else a short reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer within {timeout:.2g} s"
    except socket.gaierror as err:
        return f"unknown host: {err.strerror}"
    except OSError as err:
        return err.strerror or type(err).__name__


def _create_topic(
    client_kwargs: Mapping[str, Any], topic: str, partitions: int, timeout: float
) -> int | None:
    """Create ``topic`` unless it exists: None if created, else its partition count."""
    timeout_ms = max(1, int(timeout * 1000))
    kwargs = {**client_kwargs, "bootstrap_timeout_ms": timeout_ms}
    kwargs.setdefault("request_timeout_ms", timeout_ms)
    where = kwargs.get("bootstrap_servers", "")
    servers = where.split(",") if isinstance(where, str) else list(where)
    try:
        _check_tcp(servers, timeout)
        admin = _construct(KafkaAdminClient, kwargs)
    except (KafkaError, StreamError) as err:
        raise StreamError(
            f"cannot create topic {topic!r}: no Kafka broker answered at {where} within "
            f"{timeout} s ({type(err).__name__}: {err}); start the broker or fix the address"
        ) from err
    try:
        spec = {topic: {"num_partitions": partitions, "replication_factor": 1}}
        admin.create_topics(spec, timeout_ms=timeout_ms)
        return None
    except TopicAlreadyExistsError:
        described = admin.describe_topics([topic])
        return len(described[0]["partitions"]) if described else 0
    except KafkaError as err:
        raise StreamError(
            f"cannot create topic {topic!r} at {where}: {type(err).__name__}: {err}; create it "
            "by other means, or pass create_topic=False if it exists"
        ) from err
    finally:
        admin.close()


class _ClientTracker:
    """kafka-python's ``kafka_client`` hook, remembering the network clients it makes.

    kafka-python 3.0 starts a client's IO thread before bootstrapping, and a constructor that
    then fails (no broker answered) leaves that thread running, reconnecting forever;
    :func:`_construct` closes what the failed constructor made.
    """

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self.made: list[Any] = []

    def __call__(self, **configs: Any) -> Any:
        client = self._factory(**configs)
        self.made.append(client)
        return client


def _construct(cls: Any, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` for a kafka-python client, without a leaked IO thread on failure."""
    tracker = _ClientTracker(kwargs.get("kafka_client", cls.DEFAULT_CONFIG["kafka_client"]))
    try:
        return cls(**{**kwargs, "kafka_client": tracker})
    except BaseException:
        for client in tracker.made:
            client.close()
        raise


def topic_max_message_bytes(described: Mapping[str, Any], topic: str) -> int | None:
    """``max.message.bytes`` of ``topic`` from kafka-python's ``describe_configs`` answer
    (``{"topic": {name: {config name: {"value": ...}}}}``); ``None`` when it is not there."""
    entry = ((described.get("topic") or {}).get(topic) or {}).get("max.message.bytes")
    value = entry.get("value") if isinstance(entry, Mapping) else entry
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


# -- sink ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefusedDocument:
    """A document the broker would not take for its size: ``value`` is it packed as sent
    (:func:`unpack` reads it back), ``reason`` says why and what to change."""

    name: str
    uid: str | None
    value: bytes
    reason: str


class KafkaDocumentSink(ClosesOnExit):
    """A :class:`~streams.protocols.DocumentSink` that publishes documents to a Kafka topic.

    Subscribe it to a RunEngine (``RE.subscribe(sink)``), like bluesky-kafka's ``Publisher``.

    Parameters
    ----------
    topic : str
        Topic to publish to.
    settings : KafkaSettings
        Where the cluster is.
    key : str, optional
        The key of every message (same semantics as ``Publisher``'s ``key``): one key keeps
        every document in one partition, in order. A new uuid4 string when None.
    max_message_bytes : int
        Largest serialized document accepted; a larger one raises
        :class:`~streams.errors.DocumentError` (send big arrays as resource/datum instead).
    acks : {"all", 1, 0}
        Broker acknowledgement; ``"all"`` with kafka-python's idempotent producer (retries
        without duplicates or reordering).
    flush_on_stop : bool
        Block in ``__call__`` for a stop document until everything sent is acknowledged.
    create_topic : bool
        Create ``topic`` with one partition if it does not exist. The producer never lets the
        broker auto-create it: tansu would make 4 partitions. Pass False where clients may not
        create topics; a missing topic then raises :class:`~streams.errors.StreamError`.
    keep_refused : bool
        Keep a document the broker refuses for its size for :meth:`take_refused` and go on (a
        caller that keeps such documents itself, as the daemon does); by default it fails the
        sink like any other failed delivery.

    Notes
    -----
    Delivery is asynchronous. A failure is reported loudly: the next ``__call__`` or
    :meth:`flush` raises :class:`~streams.errors.StreamError` naming it. A document refused for
    its size need not be such a failure, since sending it again cannot help and the documents
    after it can still go: over the producer's ``max_request_size`` (a ``kafka.extra`` setting)
    it raises :class:`~streams.errors.DocumentError` at once, like one over
    ``max_message_bytes``; refused by the broker (over the topic's ``max.message.bytes``, which
    the client cannot see in advance) it is, with ``keep_refused``, kept packed for
    :meth:`take_refused` while the sink goes on. kafka-python hashes the
    key with murmur2 while bluesky-kafka (librdkafka) uses CRC32, so on a multi-partition topic the
    two put a run in different (but fixed) partitions; document topics have one partition.
    """

    def __init__(
        self,
        topic: str,
        settings: KafkaSettings,
        *,
        key: str | None = None,
        max_message_bytes: int = _DEFAULT_MAX_MESSAGE,
        acks: Literal["all", 1, 0] = "all",
        flush_on_stop: bool = False,
        create_topic: bool = True,
        keep_refused: bool = False,
    ) -> None:
        self.topic = check_topic_name(topic)
        self._keep_refused = keep_refused
        if key is not None and not isinstance(key, str):
            raise TypeError(f"{key=} must be a str (as bluesky-kafka's Publisher key) or None")
        _check_int("max_message_bytes", max_message_bytes, 1024)
        if acks not in ("all", 1, 0):
            raise ValueError(f"{acks=} must be 'all', 1 or 0")
        self.key = str(uuid.uuid4()) if key is None else key
        self._key_bytes = self.key.encode()
        self.max_message_bytes = max_message_bytes
        self._flush_on_stop = flush_on_stop
        self._settings = settings
        timeout = settings.request_timeout_ms / 1000
        # a refused port fails here at once, not after a timeout
        _check_tcp(settings.bootstrap_servers.split(","), timeout)
        if create_topic:
            _create_topic(settings.client_kwargs("admin"), self.topic, 1, timeout)
        kwargs: dict[str, Any] = {
            "acks": acks,
            "linger_ms": 0,
            "allow_auto_create_topics": False,
            "max_block_ms": settings.request_timeout_ms,
            "bootstrap_timeout_ms": settings.request_timeout_ms,
            # room for the record batch around the largest accepted value
            "max_request_size": max_message_bytes + 64 * 1024,
        }
        if acks != "all":  # idempotence needs acks=all; say so rather than have it warn
            kwargs["enable_idempotence"] = False
        kwargs.update(settings.client_kwargs("producer"))
        try:
            self._producer = _construct(KafkaProducer, kwargs)
        except KafkaError as err:
            raise _connect_error(settings, err) from err
        self._partition = self._key_partition()
        self.sent = 0
        self.failed = 0
        self._error: str | None = None
        self._closed = False
        self._delivered: dict[str, int] = {}  # "topic:partition" -> offset after the last acknowledged
        self._refused: list[RefusedDocument] = []

    def __repr__(self) -> str:
        return f"KafkaDocumentSink(topic={self.topic!r}, key={self.key!r}, sent={self.sent})"

    def _on_delivered(self, metadata: Any) -> None:
        key = f"{metadata.topic}:{metadata.partition}"
        self._delivered[key] = max(self._delivered.get(key, 0), metadata.offset + 1)

    def delivered(self) -> dict[str, int]:
        """``{"topic:partition": offset after the last document the broker acknowledged}``.

        After :meth:`flush`, where a reader of the topic is caught up with everything published
        here (:meth:`streams.tiled_mirror.TiledMirror.drain`'s ``until``).
        """
        return dict(self._delivered)

    def _key_partition(self) -> int:
        """The partition of this sink's key, chosen once as kafka-python's partitioner would
        (``murmur2(key) % n``): that saves a pure-Python hash per document."""
        try:
            partitions = sorted(self._producer.partitions_for(self.topic))
        except KafkaError as err:
            self._producer.close(timeout=0)
            raise StreamError(
                f"topic {self.topic!r} is not on the broker at {self._settings.bootstrap_servers}"
                f" ({type(err).__name__}: {err}); create it (create_topic=True does) or fix the "
                "topic name"
            ) from err
        return partitions[(murmur2(self._key_bytes) & 0x7FFFFFFF) % len(partitions)]

    def _watch(self, future: Any, name: str, uid: str | None, value: bytes) -> None:
        """Follow one send's future: its offset when acknowledged, its fate when not."""
        future.add_callback(self._on_delivered)
        future.add_errback(self._on_error, name, uid, value)

    def _on_error(self, name: str, uid: str | None, value: bytes, err: BaseException) -> None:
        if isinstance(err, (MessageSizeTooLargeError, RecordListTooLargeError)):
            # the broker's limit (kafka-python has already split any batch of several into ones)
            reason = (f"the broker at {self._settings.bootstrap_servers} refused its {len(value)} bytes "
                      f"({type(err).__name__}); raise topic {self.topic!r}'s max.message.bytes to publish "
                      "documents this large")
            if self._keep_refused:
                self._refused.append(RefusedDocument(name, uid, value, reason))
                return
            err = DocumentError(name, uid, reason)
        self.failed += 1
        self._error = f"{type(err).__name__}: {err}"

    def take_refused(self) -> list[RefusedDocument]:
        """With ``keep_refused``, the documents the broker refused for their size since the
        last call (after :meth:`flush`, every one sent before it that was refused)."""
        refused, self._refused = self._refused, []
        return refused

    def _raise_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise StreamError(
                f"{self.failed} document(s) failed to reach topic {self.topic!r} at "
                f"{self._settings.bootstrap_servers} (last: {error}); check the broker, then "
                "re-run or re-publish the run"
            )

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Publish one document (asynchronously).

        Raises
        ------
        DocumentError
            If the document cannot be serialized or is over ``max_message_bytes``.
        StreamError
            If the sink is closed, an earlier document failed, or the producer's buffer stayed
            full for ``request_timeout_ms``.
        """
        if self._closed:
            raise StreamError(f"{self!r} is closed; make a new sink")
        self._raise_failed()
        value = pack(name, doc)
        if len(value) > self.max_message_bytes:
            raise DocumentError(
                name,
                doc.get("uid"),
                f"{len(value)} bytes is over max_message_bytes={self.max_message_bytes}; send "
                "large arrays as resource/datum documents or raise max_message_bytes",
            )
        try:
            future = self._producer.send(
                self.topic, value=value, key=self._key_bytes, partition=self._partition
            )
        except MessageSizeTooLargeError as err:  # the producer's own max_request_size
            raise DocumentError(
                name,
                doc.get("uid"),
                f"{len(value)} bytes is over what the producer may send (kafka.extra's "
                f"max_request_size: {err}); lower max_message_bytes to match, or raise "
                "max_request_size",
            ) from err
        except KafkaError as err:
            raise StreamError(
                f"cannot publish {name!r} to {self.topic!r} at "
                f"{self._settings.bootstrap_servers}: {type(err).__name__}: {err}"
            ) from err
        self._watch(future, name, doc.get("uid"), value)
        self.sent += 1
        if self._flush_on_stop and name == "stop":
            self.flush()

    def flush(self, timeout: float | None = 10.0) -> None:
        """Block until every document sent is acknowledged, or ``timeout`` s pass.

        Raises
        ------
        StreamError
            On timeout, or if a document failed.
        """
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as err:
            raise StreamError(
                f"documents for {self.topic!r} were not acknowledged within {timeout} s "
                f"({type(err).__name__}: {err}); is the broker at "
                f"{self._settings.bootstrap_servers} up?"
            ) from err
        self._raise_failed()

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush, then close the producer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout)
        finally:
            self._producer.close(timeout=timeout)


def _connect_error(settings: KafkaSettings, err: KafkaError) -> StreamError:
    """The clearest error for a client that could not bootstrap."""
    try:
        settings.check_reachable(timeout=min(2.0, settings.request_timeout_ms / 1000))
    except StreamError as precise:
        return precise
    return StreamError(
        f"cannot start a Kafka client for {settings.bootstrap_servers}: "
        f"{type(err).__name__}: {err}"
    )


# -- source ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OffsetReset:
    """A partition whose next offset to read was no longer on the broker, and where reading went on.

    ``cause`` is ``"retention"`` when the broker had deleted the messages from ``offset`` up to
    ``first`` (its retention, or a ``delete-records``) before they were read: ``lost`` of them,
    whose runs are incomplete; or ``"recreated"`` when the partition's log ends before
    ``offset``: the topic was deleted and created again, or the broker lost its data, so the
    new log is read from its start and nothing in it is skipped.
    """

    key: str
    offset: int
    first: int
    end: int
    cause: Literal["retention", "recreated"]
    lost: int
    message: str

    @classmethod
    def explain(cls, key: str, offset: int, first: int, end: int) -> OffsetReset:
        """Why ``offset`` of ``key`` is out of the log's range ``[first, end)``."""
        if offset < first:
            lost = first - offset
            return cls(key, offset, first, end, "retention", lost, (
                f"{key}: {lost} message(s) at offsets {offset}..{first - 1} were deleted by the broker "
                f"(its retention) before they were read; the runs they belonged to are incomplete. "
                f"Reading on from offset {first}. Keep the reader running, or raise the topic's "
                f"retention.ms above the longest time it may be stopped."))
        return cls(key, offset, first, end, "recreated", 0, (
            f"{key}: the next offset to read, {offset}, is past the end of the partition's log "
            f"({end}): the topic was deleted and created again, or the broker lost its data. "
            f"Reading the new log from its start (offset {first}); documents of runs open before "
            f"are gone with the old log."))


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka message of a document topic, decoded.

    ``error`` is None for a good document; otherwise it says why the message is not one, and
    ``name`` and ``doc`` are None. ``size`` is the value's length in bytes.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    size: int
    name: str | None
    doc: dict[str, Any] | None
    error: str | None = None

    @property
    def position_key(self) -> str:
        """``"topic:partition"``, the key of :meth:`KafkaDocumentSource.positions`."""
        return f"{self.topic}:{self.partition}"


def _check_int(label: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label}={value!r} must be an integer >= {low}")


def _parse_offsets(offsets: Mapping[str, int], topics: Sequence[str]) -> dict[str, int]:
    parsed: dict[str, int] = {}
    for key, offset in offsets.items():
        topic, _, partition = str(key).rpartition(":")
        if topic not in topics or not partition.isdigit():
            raise ValueError(
                f"offsets key {key!r} must be 'topic:partition' with topic one of {list(topics)}"
            )
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offsets[{key!r}]={offset!r} must be an integer >= 0")
        parsed[f"{topic}:{int(partition)}"] = offset
    return parsed


class KafkaDocumentSource(ClosesOnExit):
    """Documents from Kafka topics, as :class:`Record` batches or ``(name, doc)`` pairs.

    Parameters
    ----------
    topics : str or sequence of str
        Topics to read; one that does not exist yet is picked up when it appears.
    settings : KafkaSettings
        Where the cluster is.
    group_id : str, optional
        Consumer group whose committed offsets start each partition (when ``offsets`` does not
        name it) and to which :meth:`commit` writes. Partitions are assigned, not subscribed,
        so no group join (and no rebalance) happens.
    offsets : Mapping[str, int], optional
        ``{"topic:partition": next offset to read}``, e.g. from a checkpoint's
        :meth:`positions`.
    from_beginning : bool
        Where a partition starts when neither ``offsets`` nor the group has a position: its
        first message (True) or the messages produced after the source started (False).
    max_message_bytes : int
        A message larger than this is returned as an error :class:`Record`, not decoded.
    max_buffered : int
        Most records one :meth:`poll` returns; kafka-python's own fetch buffers are bounded by
        ``fetch_max_bytes`` and ``max_partition_fetch_bytes``.
    fetch_max_wait_ms : int
        How long the broker may hold a fetch waiting for data: the latency floor when idle.

    Raises
    ------
    StreamError
        If no broker answers at construction. After that the source never raises on a broker
        outage: :meth:`poll` returns ``[]``, :attr:`connected` turns False, and kafka-python
        reconnects with exponential back-off (capped at 2 s).

    Notes
    -----
    :meth:`lag` uses the highwater mark that each fetch response carries, not ListOffsets:
    tansu 0.6 answers ListOffsets(latest) with the last batch's *base* offset + 1, which trails
    the real end whenever a batch holds more than one record. For the same reason
    ``from_beginning=False`` starts at the highwater of a first fetch, not at ``seek_to_end``.

    A position the broker no longer has is never moved silently (kafka-python's
    ``auto_offset_reset`` is ``"none"``): when a fetch is out of range, or a fetch response's
    highwater is below the next offset to read (tansu answers a fetch past the end with nothing),
    the partition is read on from its log's start, and an :class:`OffsetReset` joins
    :attr:`resets` saying why: messages deleted by retention before they were read (counted in
    :attr:`lost`), or a log that ends before the position (a recreated topic, a broker that lost
    its data). Before, the client reset by itself and the source then dropped every message
    below its old position as already delivered (tansu: it waited for offsets past its end).

    Examples
    --------
    >>> source = KafkaDocumentSource(topic, settings)  # doctest: +SKIP
    >>> for record in source.poll(0.1):  # doctest: +SKIP
    ...     if record.error is None:
    ...         agent.tell(record.name, record.doc)
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        settings: KafkaSettings,
        *,
        group_id: str | None = None,
        offsets: Mapping[str, int] | None = None,
        from_beginning: bool = True,
        max_message_bytes: int = _DEFAULT_MAX_MESSAGE,
        max_buffered: int = 1000,
        fetch_max_wait_ms: int = 10,
    ) -> None:
        names = [topics] if isinstance(topics, str) else list(topics)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{topics=} must name at least one topic, each once")
        for topic in names:
            check_topic_name(topic)
        _check_int("max_message_bytes", max_message_bytes, 1)
        _check_int("max_buffered", max_buffered, 1)
        _check_int("fetch_max_wait_ms", fetch_max_wait_ms, 0)
        if fetch_max_wait_ms >= settings.request_timeout_ms:
            raise ValueError(
                f"{fetch_max_wait_ms=} must be below request_timeout_ms="
                f"{settings.request_timeout_ms}"
            )
        self.topics = tuple(names)
        self.group_id = group_id
        self.from_beginning = from_beginning
        self.max_message_bytes = max_message_bytes
        self.max_buffered = max_buffered
        self._settings = settings
        self._timeout_ms = settings.request_timeout_ms
        self._initial = _parse_offsets(offsets or {}, names)
        # a refused port fails here at once, not after a timeout
        _check_tcp(settings.bootstrap_servers.split(","), self._timeout_ms / 1000)
        self._consumer = self._connect(fetch_max_wait_ms)
        self._lock = threading.RLock()
        self._closing = threading.Event()  # set first by close(), so an iterator lets go
        self._closed = False
        self._tps: dict[TopicPartition, str] = {}
        self._next: dict[str, int] = {}
        self._pending = list(names)
        self._connected = True
        self._last_error: str | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._next_health = 0.0
        self._next_discovery = 0.0
        self.received = 0
        self.malformed = 0
        self.lost = 0
        self.resets: list[OffsetReset] = []  # every one, in order; take_resets() gives the new ones
        self._resets_taken = 0
        try:
            self._discover()
        except KafkaError as err:
            self._consumer.close(autocommit=False)
            raise StreamError(
                f"cannot read topics {list(names)} at {settings.bootstrap_servers}: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _connect(self, fetch_max_wait_ms: int) -> KafkaConsumer:
        kwargs: dict[str, Any] = {
            "group_id": self.group_id,
            "enable_auto_commit": False,
            # never let the client move a position by itself: an out-of-range position is
            # handled (and reported) by _out_of_range. Every start position is set explicitly.
            "auto_offset_reset": "none",
            # a missing topic must not be created here: tansu would make it with 4 partitions
            "allow_auto_create_topics": False,
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "fetch_min_bytes": 1,
            "max_partition_fetch_bytes": _MiB,
            "fetch_max_bytes": 16 * _MiB,
            "max_poll_records": self.max_buffered,
            # librdkafka (bluesky-kafka's client) skips CRCs by default too (check.crcs=false);
            # kafka-python's CRC32C is pure Python unless the crc32c package is installed and
            # would take over half the decode time. extra={"check_crcs": True} turns it on.
            "check_crcs": False,
            "reconnect_backoff_ms": 50,
            "reconnect_backoff_max_ms": _RECONNECT_MAX_MS,
            "bootstrap_timeout_ms": self._timeout_ms,
        }
        kwargs.update(self._settings.client_kwargs("consumer"))
        try:
            return _construct(KafkaConsumer, kwargs)
        except KafkaError as err:
            raise _connect_error(self._settings, err) from err

    # -- state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """False while the broker is unreachable (as seen by the last :meth:`poll`)."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """The most recent connection problem, kept after it clears; None if there was none."""
        return self._last_error

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def pending_topics(self) -> tuple[str, ...]:
        """Topics that did not exist yet when last looked for."""
        return tuple(self._pending)

    def __repr__(self) -> str:
        return (
            f"KafkaDocumentSource(topics={list(self.topics)}, "
            f"bootstrap={self._settings.bootstrap_servers!r}, connected={self._connected})"
        )

    def positions(self) -> dict[str, int]:
        """``{"topic:partition": next offset to read}``, for a checkpoint or :meth:`seek`."""
        with self._lock:
            return {**self._initial, **self._next}

    def lag(self) -> int | None:
        """Messages behind the end, summed over partitions; None until every assigned partition
        has had a fetch response (the highwater mark comes from those, see Notes)."""
        with self._lock:
            if not self._tps or self._closed:
                return None
            total = 0
            for tp, key in self._tps.items():
                highwater = self._consumer.highwater(tp)
                if highwater is None:
                    return None
                total += max(0, highwater - self._next[key])
            return total

    # -- assignment ---------------------------------------------------------------------------

    def _discover(self) -> None:
        """Assign the partitions of pending topics that exist now."""
        new: list[TopicPartition] = []
        for topic in list(self._pending):
            partitions = self._consumer.partitions_for_topic(topic)
            if partitions:
                self._pending.remove(topic)
                new += [TopicPartition(topic, p) for p in sorted(partitions)]
        if not new:
            return
        old = list(self._tps)
        self._consumer.assign([*old, *new])
        try:
            self._start(new)
        except BaseException:
            # Forget the half-done assignment; the topics are looked for again next time.
            for tp in new:
                self._tps.pop(tp, None)
            self._pending += sorted({tp.topic for tp in new})
            self._consumer.assign(old) if old else self._consumer.unsubscribe()
            raise

    def _start(self, new: list[TopicPartition]) -> None:
        """Seek newly assigned partitions to where reading starts, and record that position."""
        at_end: list[TopicPartition] = []
        for tp in new:
            key = self._tps[tp] = f"{tp.topic}:{tp.partition}"
            start = self._initial.get(key)
            if start is None and self.group_id is not None:
                start = self._consumer.committed(tp, timeout_ms=self._timeout_ms)
            if start is not None:
                self._consumer.seek(tp, start)
            elif self.from_beginning:
                self._consumer.seek_to_beginning(tp)
            else:
                at_end.append(tp)
        if at_end:
            self._seek_to_highwater(at_end)
        positions = {}
        for tp in new:
            position = self._consumer.position(tp, timeout_ms=self._timeout_ms)
            if position is None:
                raise StreamError(f"no offset for {self._tps[tp]} within {self._timeout_ms} ms")
            positions[self._tps[tp]] = position
        self._next.update(positions)
        for key in positions:
            self._initial.pop(key, None)

    def _seek_to_highwater(self, partitions: list[TopicPartition]) -> None:
        """Position ``partitions`` at their end, as reported by a fetch response's highwater."""
        others = [tp for tp in self._tps if tp not in partitions]
        self._consumer.pause(*others)
        try:
            self._consumer.seek_to_end(*partitions)
            deadline = time.monotonic() + self._timeout_ms / 1000
            while any(self._consumer.highwater(tp) is None for tp in partitions):
                if time.monotonic() > deadline:
                    raise StreamError(
                        f"no fetch response for {partitions} within {self._timeout_ms} ms"
                    )
                # Records returned here are all below the highwater sought to: older than
                # the start of this source, so dropped by design (from_beginning=False).
                self._consumer.poll(timeout_ms=50, max_records=self.max_buffered)
            for tp in partitions:
                self._consumer.seek(tp, self._consumer.highwater(tp))
        finally:
            self._consumer.resume(*others)

    def seek(self, offsets: Mapping[str, int]) -> None:
        """Read next from ``{"topic:partition": offset}``; other partitions keep their place.

        Raises
        ------
        ValueError
            If a key is not ``"topic:partition"`` of this source's topics, or an offset < 0.
        """
        parsed = _parse_offsets(offsets, self.topics)
        with self._lock:
            by_key = {key: tp for tp, key in self._tps.items()}
            for key, offset in parsed.items():
                topic = key.rpartition(":")[0]
                if key in by_key:
                    self._consumer.seek(by_key[key], offset)
                    self._next[key] = offset
                elif topic in self._pending:
                    self._initial[key] = offset
                else:
                    known = sorted(k for k in by_key if k.startswith(f"{topic}:"))
                    raise ValueError(f"no partition {key!r}; {topic!r} has {known}")

    # -- reading ------------------------------------------------------------------------------

    def poll(self, timeout_s: float = 0.1) -> list[Record]:
        """Wait up to ``timeout_s`` for messages; return at most ``max_buffered`` of them.

        Never raises on a broker outage or a bad message: an outage returns ``[]`` (see
        :attr:`connected`, :attr:`last_error`), a bad message a :class:`Record` with ``error``.

        Raises
        ------
        StreamError
            If the source is closed.
        """
        if not timeout_s >= 0:
            raise ValueError(f"{timeout_s=} must be >= 0")
        with self._lock:
            if self._closed:
                raise StreamError(f"{self!r} is closed; make a new source")
            return self._poll(timeout_s)

    def _poll(self, timeout_s: float) -> list[Record]:
        started = time.monotonic()
        if started < self._retry_at:
            time.sleep(min(timeout_s, self._retry_at - started))
            return []
        try:
            if self._pending and started >= self._next_discovery:
                self._next_discovery = started + _DISCOVERY_S
                self._discover()
            if not self._tps:
                time.sleep(max(0.0, timeout_s - (time.monotonic() - started)))
                return []
            batches = self._consumer.poll(
                timeout_ms=int(timeout_s * 1000), max_records=self.max_buffered
            )
        except OffsetOutOfRangeError as err:
            self._out_of_range(err.args[0] if err.args and isinstance(err.args[0], dict) else {})
            return []
        except (KafkaError, OSError) as err:
            self._failed(f"{type(err).__name__}: {err}")
            return []
        if not batches:
            self._check_health()
            return []
        self._failures = 0
        self._connected = True
        return self._records(batches)

    def _records(self, batches: Mapping[TopicPartition, list[Any]]) -> list[Record]:
        out: list[Record] = []
        append = out.append
        limit = self.max_message_bytes
        bad = 0
        name: str | None
        doc: dict[str, Any] | None
        error: str | None
        for tp, messages in batches.items():
            key = self._tps[tp]
            floor = self._next[key]
            for m in messages:
                if m.offset < floor:  # already delivered: never hand a message out twice
                    continue
                value = m.value
                size = 0 if value is None else len(value)
                if value is None:
                    name, doc, error = None, None, "message has no value (a tombstone)"
                elif size > limit:
                    name, doc, error = None, None, (
                        f"message of {size} bytes is over max_message_bytes={limit}"
                    )
                else:
                    name, doc, error = _decode(value)
                if error is not None:
                    bad += 1
                append(Record(m.topic, m.partition, m.offset, m.timestamp, size, name, doc, error))
            if messages:
                self._next[key] = max(floor, messages[-1].offset + 1)
        self.received += len(out)
        self.malformed += bad
        return out

    def take_resets(self) -> list[OffsetReset]:
        """The offset resets (see Notes) since the last call, for a caller to report each once."""
        with self._lock:
            new = self.resets[self._resets_taken:]
            self._resets_taken = len(self.resets)
            return new

    def _out_of_range(self, partitions: Mapping[TopicPartition, int]) -> None:
        """Partitions whose next offset the broker no longer has: say why, read on from the log's start."""
        if not partitions:  # the client did not say which: every assigned partition is checked
            partitions = {tp: self._next[key] for tp, key in self._tps.items()}
        firsts = self._consumer.beginning_offsets(list(partitions), timeout_ms=self._timeout_ms)
        ends = self._consumer.end_offsets(list(partitions), timeout_ms=self._timeout_ms)
        for tp, offset in partitions.items():
            key = self._tps[tp]
            first, end = int(firsts[tp]), max(int(ends[tp]), self._consumer.highwater(tp) or 0)
            if first <= offset < end:  # in range after all (a stale answer): read on
                continue
            reset = OffsetReset.explain(key, offset, first, end)
            self._consumer.seek(tp, first)
            self._next[key] = first
            self.resets.append(reset)
            self.lost += reset.lost
            logger.warning("%s", reset.message)

    def _failed(self, reason: str) -> None:
        self._connected = False
        self._last_error = reason
        low, cap = _BACKOFF_S
        self._retry_at = time.monotonic() + min(cap, low * 2**self._failures)
        self._failures += 1

    def _check_health(self) -> None:
        """After an empty poll, see whether kafka-python holds any broker connection, and
        whether a partition's log now ends before where this source reads next (a broker
        that answers such a fetch with nothing rather than OFFSET_OUT_OF_RANGE, as tansu does)."""
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + _HEALTH_S
        shorter = {}
        for tp, key in self._tps.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None and highwater < self._next[key]:
                shorter[tp] = self._next[key]
        if shorter:
            self._out_of_range(shorter)
        count = self._consumer.metrics().get("consumer-metrics", {}).get("connection-count")
        if count is None:  # metrics disabled through extra
            return
        if count > 0:
            self._connected = True
        elif self._connected:
            self._connected = False
            self._last_error = (
                f"no connection to Kafka at {self._settings.bootstrap_servers}; reconnecting "
                f"with back-off up to {_RECONNECT_MAX_MS} ms"
            )

    def commit(self, offsets: Mapping[str, int] | None = None) -> None:
        """Store ``offsets`` (default: :meth:`positions`) in the consumer group.

        Raises
        ------
        StreamError
            If the source has no ``group_id``, or the broker did not accept the commit.
        """
        if self.group_id is None:
            raise StreamError("commit() needs a group_id; pass group_id= or keep positions()")
        parsed = _parse_offsets(offsets if offsets is not None else self.positions(), self.topics)
        with self._lock:
            by_key = {key: tp for tp, key in self._tps.items()}
            request = {by_key[k]: OffsetAndMetadata(v, "", -1) for k, v in parsed.items()
                       if k in by_key}
            if not request:
                return
            try:
                self._consumer.commit(request, timeout_ms=self._timeout_ms)
            except KafkaError as err:
                raise StreamError(
                    f"could not commit offsets of group {self.group_id!r} at "
                    f"{self._settings.bootstrap_servers}: {type(err).__name__}: {err}"
                ) from err

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(name, doc)`` of good records until :meth:`close`; bad ones are logged."""
        while not self._closing.is_set():
            with self._lock:
                if self._closed:
                    return
                records = self._poll(0.1)
            for record in records:
                if record.error is None and record.name is not None and record.doc is not None:
                    yield record.name, record.doc
                else:
                    logger.warning(
                        "skipped message %s@%d (%d bytes): %s",
                        record.position_key, record.offset, record.size, record.error,
                    )

    def close(self) -> None:
        """Close the consumer (commits nothing by itself). Safe to call twice, from any thread.

        An iteration in another thread ends after its current poll (at most 0.1 s).
        """
        self._closing.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._consumer.close(autocommit=False, timeout_ms=self._timeout_ms)
