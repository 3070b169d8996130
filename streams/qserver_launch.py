"""Start the real servers behind plan requests on loopback: Redis, the RE Manager, its HTTP API.

For the integration tests, the benchmarks and ``deploy/dev-stack``: each server is a child
process on ``127.0.0.1`` with its own ports and working directory, started and stopped by a
context manager, with its output in ``<workdir>/<name>.log`` (quoted in the error when it fails
to start).

``bluesky-queueserver`` has no Kafka option of its own: with ``kafka_server`` the RE Manager's
startup code (``deploy/qserver/startup``) subscribes a bluesky-kafka ``Publisher`` to its
RunEngine, told where by ``BEAMPILOT_KAFKA_BOOTSTRAP`` and ``BEAMPILOT_KAFKA_TOPIC``.

Examples
--------
>>> with (RedisServer() as redis,
...       REManager(redis.port, startup_dir="deploy/qserver/startup") as manager):
...     print(manager.zmq_control_addr)  # doctest: +SKIP
tcp://127.0.0.1:40123
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from streams.errors import StreamError
from streams.localhost import LOOPBACK, free_port

__all__ = ["LOOPBACK", "REManager", "RedisServer", "free_port"]

_POLL = 0.05  # s between readiness checks


def _executable(name: str, hint: str) -> str:
    """``name`` beside this interpreter (a venv's ``bin``), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StreamError(f"{name!r} not found beside {sys.executable} nor on PATH; {hint}")
    return found


def _kill_session(pid: int) -> None:
    """SIGKILL the session led by ``pid`` (one this module started), if it is still there."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _redis_answers(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server on loopback ``port`` answers ``PING`` (one try: redis-py retries)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(7).startswith(b"+PONG")
    except OSError:
        return False


class _Child:
    """One server child process: its own session (so its children stop with it) and a log file."""

    name = "server"

    def __init__(self, workdir: str | Path | None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"beampilot-{self.name}-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._log: IO[bytes] | None = None
        self.startup_s: float | None = None  # seconds start() took, for benchmarks and reports

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self._proc is not None:
            raise StreamError(f"{self.name} already started (pid {self._proc.pid}); stop() it first")
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in _reap)
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir, env={**os.environ, **(env or {})}, start_new_session=True,
        )
        # a server outlives a forgotten stop() only until this object goes or Python exits
        self._finalizer = weakref.finalize(self, _kill_session, self._proc.pid)

    def _wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise StreamError(f"{self.name} exited with code {code} while starting; "
                                  f"its log {self.log_path} ends:\n{self.log_tail()}")
            if ready():
                return
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise StreamError(f"{self.name} did not {what} within {timeout} s; raise the timeout "
                                  f"or read its log {self.log_path}, which ends:\n{self.log_tail()}")
            time.sleep(_POLL)

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the server's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def _terminate(self, grace: float) -> None:
        """SIGTERM the child's session, then SIGKILL what is left after ``grace`` s."""
        proc = self._proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)  # the session started for this child, and only it
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            _kill_session(self._proc.pid)  # its children (the manager's worker) may linger
            self._proc.wait()
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server; a stopped server stops again as a no-op."""
        self._terminate(grace=5.0)

    def close(self) -> None:
        """Stop, and remove the working directory if it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RedisServer(_Child):
    """``redis-server`` on loopback, in memory only (no snapshots, no append-only file).

    Parameters
    ----------
    port
        TCP port; ``None``: a free one.
    workdir
        Its working directory (log, and ``--dir``); ``None``: a temporary one, removed on close.
    startup_timeout
        Seconds to wait for it to answer ``PING``.
    """

    name = "redis"

    def __init__(self, port: int | None = None, *, workdir: str | Path | None = None,
                 startup_timeout: float = 10.0) -> None:
        super().__init__(workdir)
        self.port = free_port() if port is None else int(port)
        self.startup_timeout = startup_timeout

    @property
    def address(self) -> str:
        """``host:port``, as ``start-re-manager --redis-addr`` takes it."""
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        """Start it and wait until it answers ``PING``."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise StreamError("'redis-server' is not on PATH; install it with "
                              "`apt-get install -y redis-server` (Debian/Ubuntu)")
        t0 = time.perf_counter()
        self._spawn([binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir)])
        self._wait_ready(self.ping, self.startup_timeout, f"answer PING on {self.address}")
        self.startup_s = time.perf_counter() - t0
        return self

    def ping(self) -> bool:
        """Whether it answers ``PING`` now."""
        return _redis_answers(self.port)


class REManager(_Child):
    """bluesky-queueserver's RE Manager (``start-re-manager``), and optionally its HTTP server.

    Parameters
    ----------
    redis_port
        Port of the Redis server on loopback that keeps the queue and history.
    startup_dir
        The startup profile: a directory of ``*.py`` files that define ``RE``, devices and plans.
    user_group_permissions
        Permissions file; ``None``: ``user_group_permissions.yaml`` beside ``startup_dir``.
    zmq_port, info_port
        Ports of the 0MQ control and information sockets; ``None``: free ones.
    kafka_server, kafka_topic
        Broker (``host:port``) and topic the RunEngine's documents go to; ``None``: none.
    workdir
        Working directory (log, the generated list of plans and devices); ``None``: a
        temporary one, removed on close.
    http_port
        Port of the HTTP server (bluesky-httpserver) to start as well; ``None``: no HTTP server.
    api_key
        The HTTP server's single-user API key (letters and digits); ``None``: a random one.
    env
        More environment for the manager (e.g. ``BEAMPILOT_SIM_SPEED``).
    startup_timeout
        Seconds to wait for each server to answer.
    """

    name = "re-manager"

    def __init__(
        self,
        redis_port: int,
        *,
        startup_dir: str | Path,
        user_group_permissions: str | Path | None = None,
        zmq_port: int | None = None,
        info_port: int | None = None,
        kafka_server: str | None = None,
        kafka_topic: str | None = None,
        workdir: str | Path | None = None,
        http_port: int | None = None,
        api_key: str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.startup_dir = Path(startup_dir).resolve()
        if not self.startup_dir.is_dir():
            raise StreamError(f"startup_dir {self.startup_dir} is not a directory; pass the RE "
                              "Manager's startup profile, e.g. deploy/qserver/startup")
        permissions = (self.startup_dir.parent / "user_group_permissions.yaml"
                       if user_group_permissions is None else Path(user_group_permissions))
        if not permissions.is_file():
            raise StreamError(f"no user group permissions file at {permissions}; pass "
                              "user_group_permissions= (see deploy/qserver/user_group_permissions.yaml)")
        if kafka_topic is not None and kafka_server is None:
            raise ValueError(f"{kafka_topic=} given without kafka_server; pass both or neither")
        if api_key is not None and not api_key.isalnum():
            raise ValueError("api_key must be letters and digits only (bluesky-httpserver's rule)")
        super().__init__(workdir)
        self.user_group_permissions = permissions.resolve()
        self.redis_port = int(redis_port)
        self.zmq_port = free_port() if zmq_port is None else int(zmq_port)
        self.info_port = free_port() if info_port is None else int(info_port)
        self.kafka_server, self.kafka_topic = kafka_server, kafka_topic
        self.http_port = http_port
        self.api_key = api_key or (secrets.token_hex(16) if http_port is not None else None)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self._http: _HTTPServer | None = None
        self._zmq: Any = None  # zmq.Context of the control requests, made when first used

    @property
    def zmq_control_addr(self) -> str:
        """Address of the 0MQ control socket, for ``QueueServerPlanSink(zmq_control_addr=...)``."""
        return f"tcp://{LOOPBACK}:{self.zmq_port}"

    @property
    def zmq_info_addr(self) -> str:
        """Address of the 0MQ information (console output) socket."""
        return f"tcp://{LOOPBACK}:{self.info_port}"

    @property
    def http_server_uri(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the HTTP server, ``None`` if none was asked for."""
        return None if self.http_port is None else f"http://{LOOPBACK}:{self.http_port}"

    def command(self) -> list[str]:
        """The ``start-re-manager`` command line."""
        return [
            _executable("start-re-manager", "install bluesky-queueserver (pip install 'beampilot[stack]')"),
            "--startup-dir", str(self.startup_dir),
            # generated here, never written into the startup profile (a source tree)
            "--existing-plans-devices", str(self.workdir / "existing_plans_and_devices.yaml"),
            "--update-existing-plans-devices", "ENVIRONMENT_OPEN",
            "--user-group-permissions", str(self.user_group_permissions),
            "--user-group-permissions-reload", "ON_STARTUP",
            "--redis-addr", f"{LOOPBACK}:{self.redis_port}",
            "--zmq-control-addr", self.zmq_control_addr,
            "--zmq-info-addr", self.zmq_info_addr,
            # publishing console output makes the manager wait 1 s at start for subscribers
            "--zmq-publish-console", "OFF",
        ]

    def _environment(self) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", **self.env}
        if self.kafka_server is not None:
            env["BEAMPILOT_KAFKA_BOOTSTRAP"] = self.kafka_server
            if self.kafka_topic is not None:
                env["BEAMPILOT_KAFKA_TOPIC"] = self.kafka_topic
        return env

    def start(self) -> Self:
        """Start the manager (and the HTTP server) and wait until ``status`` answers.

        The RE environment is not opened: a client opens it (``QueueServerPlanSink.ensure_environment``).
        """
        if not _redis_answers(self.redis_port):
            # the manager itself would retry for ever, so check first
            raise StreamError(f"no Redis answers on {LOOPBACK}:{self.redis_port}; start one first "
                              "(RedisServer) or pass the port of a running one")
        t0 = time.perf_counter()
        self._spawn(self.command(), self._environment())
        self._wait_ready(self._status_answers, self.startup_timeout,
                         f"answer 'status' on {self.zmq_control_addr}")
        self._close_client()
        if self.http_port is not None:
            assert self.api_key is not None
            try:
                self._http = _HTTPServer(self.http_port, self.zmq_control_addr, self.zmq_info_addr,
                                         self.api_key, workdir=self.workdir).start(self.startup_timeout)
            except BaseException:
                self.stop()
                raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _request(self, method: str, params: dict[str, Any] | None = None,
                 timeout: float = 1.0) -> dict[str, Any] | None:
        """One request on the control socket; ``None`` if it got no answer in ``timeout`` s.

        A plain 0MQ REQ socket speaking the manager's JSON protocol, fresh for each request (a
        REQ socket that timed out cannot be reused), so no client object outlives the call.
        """
        import zmq

        if self._zmq is None:
            self._zmq = zmq.Context()
        sock = self._zmq.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.zmq_control_addr)
            sock.send_json({"method": method, "params": params or {}})
            if not sock.poll(int(timeout * 1000)):
                return None
            reply = sock.recv_json()
            return dict(reply) if isinstance(reply, dict) else None
        finally:
            sock.close()

    def _close_client(self) -> None:
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    def _status_answers(self) -> bool:
        return self._request("status", timeout=0.5) is not None

    def stop(self) -> None:
        """Close the RE environment, stop the manager, stop the HTTP server."""
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self.running:
            status = self._request("status")
            if (status is not None and status.get("worker_environment_exists")
                    and status.get("manager_state") == "idle"):
                self._request("environment_close")
                self._wait_until(lambda s: not s.get("worker_environment_exists"), 10.0)
            # 'safe_off' stops even a manager that is running a plan, ending its worker
            stopping = self._request("manager_stop", {"option": "safe_off"})
            if stopping is not None and stopping.get("success") and self._proc is not None:
                try:
                    self._proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    pass
        self._close_client()
        self._terminate(grace=5.0)

    def _wait_until(self, condition: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            status = self._request("status")
            if status is not None and condition(status):
                return True
            time.sleep(_POLL)
        return False


class _HTTPServer(_Child):
    """``start-bluesky-httpserver`` in front of one RE Manager, with a single-user API key."""

    name = "httpserver"

    def __init__(self, port: int, zmq_control_addr: str, zmq_info_addr: str, api_key: str,
                 *, workdir: Path) -> None:
        super().__init__(workdir)
        self.port, self.api_key = port, api_key
        self._env = {
            "QSERVER_ZMQ_CONTROL_ADDRESS": zmq_control_addr,
            "QSERVER_ZMQ_INFO_ADDRESS": zmq_info_addr,
            "QSERVER_HTTP_SERVER_SINGLE_USER_API_KEY": api_key,
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, timeout: float = 30.0) -> Self:
        binary = _executable("start-bluesky-httpserver",
                             "install bluesky-httpserver (pip install 'beampilot[stack]')")
        self._spawn([binary, "--host", LOOPBACK, "--port", str(self.port)], self._env)
        self._wait_ready(self._answers, timeout, f"answer on http://{LOOPBACK}:{self.port}/api/status")
        return self

    def _answers(self) -> bool:
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.port}/api/status",
                                         headers={"Authorization": f"ApiKey {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
