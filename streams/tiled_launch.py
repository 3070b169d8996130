"""``TiledServer``: a real ``tiled serve catalog`` on loopback, for development and tests.

The server keeps everything in one working directory::

    <workdir>/catalog.db     SQLite catalog (metadata, structure)
    <workdir>/data/          writable file storage (zarr arrays)
    <workdir>/data.duckdb    writable tabular storage (event tables written by TiledWriter)
    <workdir>/tiled.log      the server's stdout and stderr

Restarting on the same ``workdir`` serves what an earlier server wrote.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

from streams.errors import StreamError
from streams.lifecycle import StopsOnExit
from streams.localhost import free_port

__all__ = ["TiledServer"]

_HOST = "127.0.0.1"
_LOG_TAIL_LINES = 30


class TiledServer(StopsOnExit):
    """Start and stop ``tiled serve catalog`` with a writable SQLite catalog on ``127.0.0.1``.

    Parameters
    ----------
    port : int, optional
        TCP port to bind. ``None`` picks a free one when the object is made.
    workdir : str or os.PathLike
        Directory for the catalog, its data and the server log (created if absent).
    api_key : str, optional
        The single-user API key every client must present. ``None`` generates a random one,
        readable as :attr:`api_key`.
    startup_timeout : float
        Seconds to wait for ``/api/v1/`` to answer before :meth:`start` gives up.
    readable : sequence of paths
        Directories whose files the server may serve (``tiled serve catalog -r``): where
        detectors write the HDF5 files a run's stream resources name, so the writer can register
        them and readers get the frames through tiled.

    Examples
    --------
    >>> with TiledServer(workdir=tmp_path) as server:  # doctest: +SKIP
    ...     client = tiled.client.from_uri(server.uri, api_key=server.api_key)
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        workdir: str | os.PathLike[str],
        api_key: str | None = None,
        startup_timeout: float = 60.0,
        readable: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"{port=} is not a TCP port; pass 1..65535 or None for a free one")
        if api_key is not None and not api_key:
            raise ValueError("api_key='' is empty; pass a non-empty key or None to generate one")
        if not startup_timeout > 0:
            raise ValueError(f"{startup_timeout=} must be positive")
        self.port: int = free_port() if port is None else port
        self.workdir = Path(workdir)
        self.api_key: str = api_key if api_key is not None else secrets.token_hex(16)
        self.startup_timeout = startup_timeout
        self.readable = [Path(d).resolve() for d in readable]
        self.startup_seconds: float | None = None
        """Seconds the last :meth:`start` took until the server answered."""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        """The server's root URI, e.g. ``http://127.0.0.1:8123``; pass it to tiled clients."""
        return f"http://{_HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file the server's stdout and stderr go to."""
        return self.workdir / "tiled.log"

    @property
    def running(self) -> bool:
        """Whether the server process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The command line :meth:`start` runs (the API key is in it)."""
        return [
            sys.executable, "-m", "tiled", "serve", "catalog",
            str(self.workdir / "catalog.db"), "--init",
            "-w", str(self.workdir / "data"),
            "-w", f"duckdb:///{self.workdir / 'data.duckdb'}",
            "--api-key", self.api_key,
            "--host", _HOST, "--port", str(self.port),
            *[arg for d in self.readable for arg in ("-r", str(d))],
        ]

    def start(self) -> Self:
        """Start the server and wait until ``/api/v1/`` answers.

        Returns
        -------
        TiledServer
            ``self``, so that ``server = TiledServer(...).start()`` works.

        Raises
        ------
        StreamError
            If it is already running, the process exits, or it does not answer within
            ``startup_timeout``; the message quotes the end of the server log.
        """
        if self.running:
            raise StreamError(f"tiled server at {self.uri} is already running; stop() it first")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed in stop()
        began = time.monotonic()
        # stdin from /dev/null: uvicorn must not wait on the caller's terminal.
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        try:
            self._wait_until_answering(began)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds). Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _wait_until_answering(self, began: float) -> None:
        assert self._process is not None
        url = f"{self.uri}/api/v1/"
        while True:
            if (code := self._process.poll()) is not None:
                raise StreamError(
                    f"tiled server for {self.uri} exited with status {code} during startup "
                    f"(command: {' '.join(self._redacted())}); log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() - began > self.startup_timeout:
                raise StreamError(
                    f"tiled server did not answer at {url} within {self.startup_timeout} s; "
                    f"raise startup_timeout or read its log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' if there is none)."""
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _redacted(self) -> list[str]:
        return [("<api key>" if arg == self.api_key else arg) for arg in self.command()]
