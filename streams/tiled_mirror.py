"""Mirror a Kafka topic of event-model documents into a tiled server, run by run, surviving
outages of tiled and restarts of the process.

Writing each document to tiled as it is made (:class:`~streams.tiled_io.TiledDocumentSink`
called in line) loses what is made while tiled is down, and a run cut off mid-way cannot be
continued: Bluesky's ``TiledWriter`` keeps the run's nodes in memory and refuses a second start.
:class:`TiledMirror` reads the documents back from the Kafka topic they were published to, which
keeps them, and writes them into tiled in order from its own position:

* while tiled does not answer, nothing is skipped: the mirror waits (2 s, then 4, ... up to
  60 s between tries, each a quick ``check_reachable``), says so once, and says when it is back;
* a run whose start reached tiled but whose stop did not (tiled went away mid-run, or this
  process was killed) is written again whole from its start document, after its partial copy in
  tiled is deleted; so every run in tiled is either whole or still being written;
* a document tiled refuses while it answers (a schema it cannot store, say) fails its run: the
  run is tried once more from its start, then reported by uid and skipped, and the mirror goes on
  with the other runs;
* its position and the runs open in tiled are saved to a small JSON file (atomically) after
  every run and on close, so a restarted mirror goes on where it was. Without the file (or with
  an old one) it reads the topic from its start (or from that position) and leaves alone the runs
  tiled already has whole, stop document included.

It runs in its own thread, with its own Kafka consumer and tiled client, so a slow or absent
tiled never holds up whoever publishes the documents.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from streams.errors import DocumentError, StreamError
from streams.files import replace_file
from streams.lifecycle import ClosesOnExit
from streams.tiled_io import TiledDocumentSink, TiledUnreachableError, check_reachable

__all__ = ["TiledMirror"]

logger = logging.getLogger(__name__)

#: the first and the longest wait (s) between tries while tiled does not answer
RETRY_S = (2.0, 60.0)
#: tries of a run tiled refuses while it answers, before the run is reported and skipped
RUN_TRIES = 2


class TiledMirror(ClosesOnExit):
    """Copy every run on a Kafka document topic into tiled, whole, exactly once.

    Parameters
    ----------
    source_factory
        ``source_factory(offsets)`` makes the Kafka document source, reading from
        ``{"topic:partition": offset}`` (where none is given: the topic's first message);
        e.g. ``lambda o: KafkaDocumentSource(topic, settings, offsets=o)``.
    uri, api_key
        The tiled server (or a writable container on it) and a key that may write and delete.
    state_path
        Where the mirror keeps its position and the runs open in tiled (JSON); read at start
        when it exists.
    sink_factory
        Makes the writer, ``TiledDocumentSink(uri, api_key=api_key)`` by default.
    retry_s
        The first and the longest wait (s) between tries while tiled does not answer (each wait
        twice the last).

    Examples
    --------
    >>> mirror = TiledMirror(lambda o: KafkaDocumentSource(topic, settings, offsets=o),  # doctest: +SKIP
    ...                      "http://127.0.0.1:8000", api_key=key, state_path="mirror.json").start()
    >>> mirror.status()  # doctest: +SKIP
    {'connected': True, 'behind': 0, 'runs_written': 12, ...}
    """

    def __init__(self, source_factory: Callable[[dict[str, int]], Any], uri: str, *,
                 api_key: str | None = None, state_path: str | os.PathLike[str],
                 sink_factory: Callable[[], Any] | None = None,
                 retry_s: tuple[float, float] = RETRY_S) -> None:
        if not 0 < retry_s[0] <= retry_s[1]:
            raise ValueError(f"retry_s={retry_s} must be (first, longest) with 0 < first <= longest")
        self.uri = uri
        self._retry_s = (float(retry_s[0]), float(retry_s[1]))
        self._api_key = api_key
        self.state_path = Path(state_path)
        self._sink_factory = sink_factory or (lambda: TiledDocumentSink(uri, api_key=api_key))
        state = self._load()
        self._position: dict[str, int] = state["position"]  # next offset to write, per partition
        self._open: dict[str, list[Any]] = state["open"]  # run uid -> [partition, start offset]
        self._source = source_factory(self._start_offsets())
        self._sink: Any = None
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._reason = ""
        self._wait, self._next_try = self._retry_s[0], 0.0
        self._failed_runs: dict[str, str] = {}  # run uid -> why tiled does not have it
        self._tries: dict[str, int] = {}
        self._skipping: set[str] = set()  # runs given up on: their remaining documents are skipped
        self._whole: set[str] = set()  # runs read again that tiled has whole: skipped too
        self._run_of: dict[str, str] = {}  # descriptor / resource uid -> run uid
        self._rewrite: set[str] = set(self._open)  # runs to write again whole when they come by
        self._below = dict(self._position)  # documents before this were written (unless rewritten)
        self.documents_written = 0
        self.runs_written = 0
        self.offset_resets: list[str] = []  # what the source said of positions gone from the broker
        self._unwritten = 0
        self._snapshot: dict[str, Any] = {}
        self._publish()

    # -- state -------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"position": {}, "open": {}}
        try:
            state = json.loads(self.state_path.read_text())
            position = {str(k): int(v) for k, v in state["position"].items()}
            open_runs = {str(k): [str(v[0]), int(v[1])] for k, v in state["open"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise StreamError(f"the tiled mirror's state {self.state_path} cannot be read ({err}); "
                              "move it away to mirror the topic from its start (runs tiled has whole "
                              "are left as they are)") from err
        return {"position": position, "open": open_runs}

    def _save(self) -> None:
        # the mirror's thread saves after each run, close() once more: never both into one .tmp
        with self._save_lock:
            state = json.dumps({"position": dict(self._position), "open": dict(self._open)})
            replace_file(self.state_path, state.encode(), fsync=False)

    def _start_offsets(self) -> dict[str, int]:
        """Where to read from: the position, or the start of the earliest run open in tiled."""
        offsets = dict(self._position)
        for partition, start in self._open.values():
            offsets[partition] = min(offsets.get(partition, start), start)
        return offsets

    # -- running -----------------------------------------------------------------------------
    def start(self) -> TiledMirror:
        """Mirror in a background thread until :meth:`close`. A tiled that does not answer now is
        waited for, as an outage is."""
        try:
            check_reachable(self.uri, api_key=self._api_key, timeout=2.0)
        except TiledUnreachableError as err:
            self._lost(err)
        self._thread = threading.Thread(target=self._run, name="tiled-mirror", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(0.2)
            except Exception:  # the thread must not die: log it and go on after a pause
                logger.exception("tiled mirror: unexpected error; going on in 5 s")
                self._stop.wait(5.0)

    def step(self, timeout_s: float = 0.0) -> int:
        """Write what the topic has (waiting up to ``timeout_s`` for it); the documents written."""
        if self._down_since is not None and not self._back():
            return 0
        written = 0
        records = self._source.poll(timeout_s)
        self._take_resets()
        for i, record in enumerate(records):
            self._unwritten = len(records) - i  # read, not yet written: behind, too
            if record.error is not None:
                logger.warning("tiled mirror: skipped message %s:%s@%s: %s", record.topic, record.partition,
                               record.offset, record.error)
                self._advance(f"{record.topic}:{record.partition}", record.offset)
                continue
            if not self._write(record):
                break  # tiled went away, or a run is written again: the rest is read again
            written += 1
            self._publish()
        self._unwritten = 0
        self._publish()
        return written

    def _write(self, record: Any) -> bool:
        """Write one document. False: reading goes back (tiled stopped answering, or a run it
        refused is written again), so the records after this one in the batch are read again."""
        partition, name, doc = f"{record.topic}:{record.partition}", record.name, record.doc
        run = self._run_uid(name, doc)
        old = record.offset < self._below.get(partition, 0)
        if (old and run not in self._rewrite) or run in self._skipping or run in self._whole:
            self._advance(partition, record.offset, run if name == "stop" else None)
            return True
        try:
            if self._sink is None:
                self._sink = self._sink_factory()
            # a mirror without its state file, or with an old one, reads again runs tiled has whole
            if name == "start" and not self._forget_partial(run, unless_whole=True):
                self._whole.add(run)  # left as they are: their documents are skipped up to the stop
                self._advance(partition, record.offset)
                return True
            self._sink(name, doc)
        except (StreamError, DocumentError) as err:
            if isinstance(err, DocumentError) or self._answers():
                return self._refused(run, partition, record.offset, name, err)
            self._lost(err)
            return False
        self.documents_written += 1
        if name == "start":
            self._open[run] = [partition, record.offset]
        self._advance(partition, record.offset, run if name == "stop" else None)
        return True

    def _run_uid(self, name: str, doc: dict[str, Any]) -> str:
        """The uid of the run a document belongs to ('' if unknown)."""
        if name == "start":
            return str(doc["uid"])
        if name in ("descriptor", "resource"):
            self._run_of[doc["uid"]] = doc.get("run_start", "")
            return str(doc.get("run_start", ""))
        if name in ("stop", "stream_resource"):
            return str(doc.get("run_start", ""))
        if name in ("event", "event_page", "stream_datum"):
            return self._run_of.get(doc.get("descriptor", ""), "")
        if name in ("datum", "datum_page"):
            return self._run_of.get(doc.get("resource", ""), "")
        return ""

    def _take_resets(self) -> None:
        """Follow the source to the start of a partition's log when its position was gone from the
        broker (:class:`streams.kafka.OffsetReset`): the new log's documents are new, never "already
        written"; runs open in a recreated log will get no more documents and are reported failed."""
        for reset in self._source.take_resets() if hasattr(self._source, "take_resets") else ():
            key = reset.key
            self._position[key] = reset.first
            self._below[key] = min(self._below.get(key, 0), reset.first)
            if reset.cause == "recreated":
                # unlike a refused run (_refused), its partial copy in tiled stays: the rest of its
                # documents is nowhere now, so that copy is all there is of it
                for run in [r for r, (partition, _) in self._open.items() if partition == key]:
                    self._failed_runs[run] = (f"its other documents went with the old log of {key}; the part "
                                              f"written is kept in tiled, without a stop: {reset.message}")
                    self._open.pop(run)
                    self._rewrite.discard(run)
            self.offset_resets.append(reset.message)
            logger.warning("tiled mirror: %s", reset.message)
            self._save()

    def _advance(self, partition: str, offset: int, stopped: str | None = None) -> None:
        self._position[partition] = max(self._position.get(partition, 0), offset + 1)
        if stopped is not None:
            if stopped in self._open and stopped not in self._skipping:
                self.runs_written += 1
            self._open.pop(stopped, None)
            self._rewrite.discard(stopped)
            self._skipping.discard(stopped)
            self._whole.discard(stopped)
            self._tries.pop(stopped, None)
            self._run_of = {k: v for k, v in self._run_of.items() if v != stopped}
            self._save()

    def _forget_partial(self, run: str, *, unless_whole: bool = False) -> bool:
        """Delete the copy of ``run`` in tiled, if there is one and it has no stop (or, without
        ``unless_whole``, whatever it has); False if it was left because it is whole.

        Raises
        ------
        StreamError
            If tiled does not answer (the tiled client's own errors, named).
        """
        if self._sink is None:
            self._sink = self._sink_factory()
        client = self._sink._client
        try:
            node = client.get(run)
            if node is None:
                return True
            if unless_whole and node.metadata.get("stop"):
                return False
            client.delete_contents(run, recursive=True, external_only=False)
        except Exception as err:  # httpx's and tiled's own, from a server that went away
            raise StreamError(f"tiled at {self.uri}: looking up or deleting run {run}: "
                              f"{type(err).__name__}: {err}") from err
        logger.warning("tiled mirror: deleted the partial copy of run %s in tiled", run)
        return True

    def _refused(self, run: str, partition: str, offset: int, name: str, err: Exception) -> bool:
        """Tiled answers but refused a document: try its run once more from the start, then skip
        it. False if reading goes back to write the run again."""
        self._tries[run] = self._tries.get(run, 0) + 1
        if run and self._tries[run] < RUN_TRIES and run in self._open:
            logger.warning("tiled mirror: %s of run %s refused (%s); writing the run again", name, run, err)
            self._reopen()
            return False
        why = f"tiled refused its {name} document: {err}"
        if self._open.pop(run, None) is not None:
            try:  # a run in tiled is whole or being written: not a part of one
                self._forget_partial(run)
            except Exception as gone:  # noqa: BLE001 — said in the run's report, and the mirror goes on
                why += f"; its partial copy in tiled could not be deleted ({type(gone).__name__}: {gone})"
        self._failed_runs[run] = why
        self._skipping.add(run)
        logger.error("tiled mirror: run %s is not in tiled: %s. Its documents are on the Kafka topic; "
                     "the other runs go on", run or "(unknown)", why)
        self._advance(partition, offset, run if name == "stop" else None)
        return True

    def _answers(self) -> bool:
        try:
            check_reachable(self.uri, api_key=self._api_key, timeout=2.0)
        except StreamError:
            return False
        return True

    def _lost(self, err: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since, self._wait = now, self._retry_s[0]
            logger.warning("tiled mirror: tiled at %s does not answer (%s); the documents wait on the Kafka "
                           "topic and are written when it is back (trying every %.0f-%.0f s)",
                           self.uri, err, *self._retry_s)
        self._reason, self._next_try = str(err), now + self._wait
        self._reopen()
        self._publish()

    def _back(self) -> bool:
        """While tiled is down: try it when it is time; True once it answers again."""
        now = time.monotonic()
        if now < self._next_try:
            self._stop.wait(min(self._next_try - now, 0.5))
            return False
        if not self._answers():
            self._wait = min(2 * self._wait, self._retry_s[1])
            self._next_try = now + self._wait
            return False
        logger.warning("tiled mirror: tiled at %s answers again after %.0f s; writing on",
                       self.uri, now - (self._down_since or now))
        self._down_since = None
        self._publish()
        return True

    def _reopen(self) -> None:
        """Read again from the position, or from the start of a run open in tiled: those runs are
        written again whole (a fresh writer cannot continue them)."""
        self._drop_sink()
        self._rewrite |= set(self._open)
        self._below = dict(self._position)
        self._source.seek(self._start_offsets())

    def _drop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 — a writer of a server that went away
                logger.debug("tiled mirror: closing the old writer: %s", err)

    # -- reporting and closing ---------------------------------------------------------------
    def _publish(self) -> None:
        """What :meth:`status` reports, copied here by the mirror's thread."""
        down = self._down_since
        lag = self._source.lag() if hasattr(self._source, "lag") else None
        behind = None if lag is None else lag + self._unwritten
        snapshot = {"uri": self.uri, "connected": down is None, "down_since": down, "behind": behind,
                    "at": time.monotonic(), "position": dict(self._position),
                    "reason": self._reason if down is not None else "",
                    "runs_written": self.runs_written, "documents_written": self.documents_written,
                    "open_runs": sorted(self._open), "failed_runs": dict(self._failed_runs),
                    "offset_resets": list(self.offset_resets)}
        with self._lock:
            self._snapshot = snapshot

    def status(self) -> dict[str, Any]:
        """JSON-able: ``connected``, ``down_for_s``, ``reason``, ``behind`` (documents on the topic
        not yet written, when known), ``position`` (per partition, the offset after the last
        document written or skipped), ``runs_written``, ``documents_written``, ``open_runs``,
        ``failed_runs`` (uid: why tiled does not have it), ``offset_resets`` (what the source said
        of positions gone from the broker: retention, a recreated topic), as of ``age_s`` seconds ago (the
        mirror's last document or poll: a write tiled is slow to answer makes it grow). Cheap: it
        never waits on the mirror's consumer or on tiled."""
        with self._lock:
            out = dict(self._snapshot)
        down = out.pop("down_since")
        out["down_for_s"] = None if down is None else time.monotonic() - down
        out["age_s"] = time.monotonic() - out.pop("at")
        return out

    def drain(self, timeout_s: float = 30.0, until: Mapping[str, int] | None = None) -> bool:
        """Write until the topic has nothing more (or ``timeout_s``); True if caught up.

        ``until`` (``{"topic:partition": offset}``, e.g. the publisher's
        :meth:`streams.kafka.KafkaDocumentSink.delivered` after its flush): caught up once every
        document below those offsets is written (or reported failed). Without it, caught up
        means the topic's end as the consumer last heard it, which can be out of date: a drain
        right after a flush was seen to return True with the last run not yet read (2 of 20
        tries).
        """
        began = time.monotonic()
        while time.monotonic() < began + timeout_s:
            if self._thread is None:
                self.step(0.1)
            else:
                time.sleep(0.05)
            status = self.status()
            if until is not None:
                if all(status["position"].get(key, 0) >= offset for key, offset in until.items()):
                    return True
                continue
            fresh = status["age_s"] < time.monotonic() - began  # published since the drain began
            if fresh and status["connected"] and status["behind"] == 0:
                return True
        return False

    def close(self) -> None:
        """Stop the thread, save the position, close the consumer and the tiled client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)
        try:
            self._save()
        except OSError as err:
            logger.error("tiled mirror: cannot save its state to %s: %s", self.state_path, err)
        self._drop_sink()
        self._source.close()
