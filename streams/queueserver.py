"""A plan sink that queues plan requests on bluesky-queueserver (RE Manager), once each.

:class:`QueueServerPlanSink` talks to an RE Manager through bluesky-queueserver-api, over 0MQ
(the default) or through bluesky-httpserver with an API key. Each :class:`PlanRequest` becomes
one queue item::

    {"item_type": "plan", "name": plan, "args": [...], "kwargs": {...},
     "meta": {"beampilot_request_key": key, "beampilot_agent": agent}}

The idempotency key rides in the item's ``meta``: the manager keeps ``meta`` on the item in the
queue, while it runs and in the history, and runs the plan as ``RE(plan, **meta)``, so the key
also lands in the start document of every run the item opens; the plan's own arguments stay
untouched. Before adding, the sink looks for the key in the queue, the running item and the
history, in the order items move through them, so a request is queued once even across a
restart of the sink's process. The safety gate is the caller's: this sink only sends.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from streams.errors import StreamError
from streams.lifecycle import ClosesOnExit
from streams.requests import PlanRequest

__all__ = [
    "AGENT_META_KEY",
    "REQUEST_META_KEY",
    "QueueItemRejectedError",
    "QueueServerPlanSink",
    "QueueServerUnreachableError",
    "close_api",
]

#: ``meta`` (and start-document) key of a queue item's idempotency key
REQUEST_META_KEY = "beampilot_request_key"
#: ``meta`` (and start-document) key of the agent that asked for the item
AGENT_META_KEY = "beampilot_agent"

_POLL = 0.05  # s between status polls while waiting
_ENVIRONMENT_CHANGING = ("creating_environment", "closing_environment", "destroying_environment")


class QueueServerUnreachableError(StreamError):
    """The RE Manager (or its HTTP server) did not answer."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(
            f"queue server at {address} did not answer: {reason.rstrip('.')}. Check that it runs and listens "
            "there (start-re-manager --zmq-control-addr, or the HTTP server's --host/--port)"
        )


class QueueItemRejectedError(StreamError):
    """The RE Manager refused a queue item (plan not allowed, bad arguments, ...)."""

    def __init__(self, address: str, request: PlanRequest, reason: str, hint: str) -> None:
        self.address = address
        self.key = request.key
        self.plan = request.plan
        self.reason = reason
        super().__init__(
            f"queue server at {address} refused request {request.key!r} (plan {request.plan!r}): "
            f"{reason}. {hint}"
        )


def _item_key(item: Mapping[str, Any] | None) -> str | None:
    if not item:
        return None
    meta = item.get("meta")
    if isinstance(meta, Mapping):
        key = meta.get(REQUEST_META_KEY)
        return key if isinstance(key, str) else None
    return None


def _item_agent(item: Mapping[str, Any]) -> str | None:
    meta = item.get("meta")
    return meta.get(AGENT_META_KEY) if isinstance(meta, Mapping) else None


def _reason(message: str) -> str:
    """The server's reason on one line, without the API's prefix or the item dump it appends."""
    message = message.removeprefix("Request failed: ").split("\nPlan: ")[0]
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith("For further information")]
    return "; ".join(kept).rstrip(".") or "(no reason given)"


def close_api(api: Any) -> None:
    """Close a bluesky-queueserver-api client (threads flavour) and every 0MQ context it made.

    ``REManagerAPI.close()`` closes the 0MQ sockets of the request client but leaves its
    ``zmq.Context``, and the console and system-info monitors' subscriber sockets and contexts,
    open (bluesky-queueserver 0.0.25, bluesky-queueserver-api 0.0.13). Each then warns
    (``ResourceWarning``) whenever it happens to be collected, in some later test or at exit.
    This ends them, reaching into the API's private attributes: ``tests/streams`` checks that
    no context is left, so an upstream change shows up there.
    """
    api.close()
    client = getattr(api, "_client", None)
    thread = getattr(client, "_zmq_receive_thread", None)
    if thread is not None:
        thread.join(1.0)  # it polls with a 0.1 s timeout, then sees that it was closed
    context = getattr(client, "_ctx", None)
    if context is not None and not context.closed:
        context.term()  # its socket is closed and lingers 0.1 s at most
    for monitor in (getattr(api, "_console_monitor", None), getattr(api, "_system_info_monitor", None)):
        socket = getattr(getattr(monitor, "_rco", None), "_socket", None)
        if socket is not None and not socket.closed:
            socket.close(linger=0)
            socket.context.term()


class QueueServerPlanSink(ClosesOnExit):
    """Sends plan requests to a bluesky-queueserver RE Manager, each key at most once.

    Parameters
    ----------
    zmq_control_addr
        The manager's 0MQ control address, e.g. ``tcp://127.0.0.1:60615``. With neither this nor
        ``http_server_uri``: ``$QSERVER_ZMQ_CONTROL_ADDRESS``, else the queueserver's default.
    http_server_uri
        Talk through bluesky-httpserver at this URI instead, e.g. ``http://127.0.0.1:60610``.
    api_key
        API key for the HTTP server (only with ``http_server_uri``).
    user, user_group
        Who submits (0MQ only: over HTTP the server decides); the group's permissions decide
        which plans and devices are allowed.
    timeout
        Seconds to wait for any one answer.

    Examples
    --------
    >>> sink = QueueServerPlanSink(zmq_control_addr="tcp://127.0.0.1:60615")  # doctest: +SKIP
    >>> sink.check_reachable(); sink.ensure_environment()  # doctest: +SKIP
    >>> uid = sink.submit(request); sink.start_queue()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        zmq_control_addr: str | None = None,
        http_server_uri: str | None = None,
        api_key: str | None = None,
        user: str = "beampilot",
        user_group: str = "primary",
        timeout: float = 3.0,
    ) -> None:
        if zmq_control_addr is not None and http_server_uri is not None:
            raise ValueError(f"pass zmq_control_addr or http_server_uri, not both: {zmq_control_addr=}, "
                             f"{http_server_uri=}")
        if api_key is not None and http_server_uri is None:
            raise ValueError("api_key is for the HTTP server: pass http_server_uri as well")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 s; got {timeout=}")
        self.user_group = user_group
        self.timeout = float(timeout)
        #: where the manager is: the HTTP server's URI or the 0MQ control address
        self.address: str = http_server_uri or zmq_control_addr or os.environ.get(
            "QSERVER_ZMQ_CONTROL_ADDRESS", "tcp://localhost:60615")
        self._api = self._make_api(zmq_control_addr, http_server_uri, api_key, timeout)
        self._via_zmq = http_server_uri is None
        if self._via_zmq:
            self._api.user = user
            self._api.user_group = user_group
        self._sent: dict[str, str] = {}  # key -> item uid, of items this process added or found
        self._history_uid: str | None = None
        self._history: dict[str, dict[str, Any]] = {}  # key -> last history item with it
        self._queue: dict[str, Any] | None = None  # the last queue_get answer
        self._round = False  # inside one_look(): reads share one look at the server
        self._look: tuple[dict[str, Any], dict[str, Any]] | None = None  # that look: (status, queue)
        self._lock = threading.Lock()

    def _make_api(self, zmq_addr: str | None, http_uri: str | None, api_key: str | None,
                  timeout: float) -> Any:
        polling = {"status_expiration_period": _POLL, "status_polling_period": _POLL}
        if http_uri is not None:
            if not re.fullmatch(r"https?://[^/\s]+/?", http_uri):
                raise ValueError(f"http_server_uri={http_uri!r} is not an HTTP server address; give "
                                 "http://HOST:PORT")
            from bluesky_queueserver_api.http import REManagerAPI as HTTPAPI

            api = HTTPAPI(http_server_uri=http_uri, timeout=timeout, **polling)
            if api_key is not None:
                api.set_authorization_key(api_key=api_key)
            return api
        if not re.fullmatch(r"tcp://[^\s:/]+:\d+|ipc://\S+", self.address):
            raise ValueError(f"zmq_control_addr={self.address!r} is not a 0MQ address; give "
                             "tcp://HOST:PORT (the manager's --zmq-control-addr)")
        from bluesky_queueserver_api.zmq import REManagerAPI as ZMQAPI

        return ZMQAPI(zmq_control_addr=self.address, timeout_recv=timeout, **polling)

    # -- talking to the server -------------------------------------------------------------

    def _call(self, api_method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``self._api.<api_method>(...)`` with the API's exceptions turned into StreamErrors.

        ``api_method`` is always a literal of this module, never a name from the network.
        """
        api = self._api
        try:
            return getattr(api, api_method)(*args, **kwargs)
        except (api.RequestTimeoutError, api.HTTPRequestError, TimeoutError, ConnectionError) as ex:
            raise QueueServerUnreachableError(self.address, f"{type(ex).__name__}: {ex}") from ex
        except api.HTTPClientError as ex:
            raise StreamError(f"queue server at {self.address} refused {api_method!r}: {ex}; check the "
                              "api_key and the HTTP server's authorization settings") from ex
        except api.HTTPServerError as ex:
            raise StreamError(f"queue server at {self.address} failed on {api_method!r}: {ex}; read "
                              "the HTTP server's log") from ex

    def _send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A read-only request (``queue_get``, ``history_get``) that should never be refused."""
        try:
            return dict(self._call("send_request", method=method, params=params))
        except self._api.RequestFailedError as ex:
            raise StreamError(f"queue server at {self.address} refused {method!r}: "
                              f"{_reason(str(ex))}") from ex

    def status(self) -> dict[str, Any]:
        """The manager's status now (``manager_state``, ``items_in_queue``, ...)."""
        return dict(self._call("status", reload=True))

    def check_reachable(self) -> dict[str, Any]:
        """Fail fast, with :class:`QueueServerUnreachableError`, if the manager does not answer.

        Returns
        -------
        dict
            The manager's status.
        """
        return self.status()

    def _wait(self, condition: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict:
        t0 = time.monotonic()
        while True:
            status = self.status()
            if condition(status):
                return status
            if time.monotonic() - t0 > timeout:
                raise StreamError(f"queue server at {self.address}: {what} not done within {timeout} s "
                                  f"(manager_state={status.get('manager_state')!r}); raise the "
                                  "timeout or read the RE Manager's log")
            time.sleep(_POLL)

    def ensure_environment(self, timeout: float = 60.0) -> None:
        """Open the RE environment (run the startup code) if it is closed, and wait until it is open.

        Raises
        ------
        StreamError
            The environment did not open in ``timeout`` s, or opening it failed (most often an
            error in the startup code, printed in the RE Manager's log).
        """
        status = self._wait(lambda s: s["manager_state"] not in _ENVIRONMENT_CHANGING, timeout,
                            "an environment change already under way")
        if status["worker_environment_exists"]:
            return
        if status["manager_state"] == "idle":
            try:
                self._call("environment_open")
            except self._api.RequestFailedError as ex:
                raise StreamError(f"queue server at {self.address} would not open the RE environment: "
                                  f"{_reason(str(ex))}") from ex
        status = self._wait(lambda s: s["manager_state"] != "creating_environment", timeout,
                            "opening the RE environment")
        if not status["worker_environment_exists"]:
            raise StreamError(f"queue server at {self.address} failed to open the RE environment; "
                              "the startup code raised, most likely: read the RE Manager's log")

    def start_queue(self) -> bool:
        """Start running the queue if the manager is idle with items queued.

        Returns
        -------
        bool
            Whether this call started it (``False``: already running, paused, or nothing queued).
        """
        status, _ = self._view()
        if status["manager_state"] != "idle" or status["items_in_queue"] == 0:
            return False
        try:
            self._changed()
            self._call("queue_start")
        except self._api.RequestFailedError as ex:
            raise StreamError(f"queue server at {self.address} would not start the queue: "
                              f"{_reason(str(ex))}; is the RE environment open "
                              "(ensure_environment)?") from ex
        return True

    def wait_for_idle(self, timeout: float = 60.0) -> None:
        """Wait until the manager is idle (the queue ran out or was stopped)."""
        self._wait(lambda s: s["manager_state"] == "idle", timeout, "running the queue")

    # -- plan requests -----------------------------------------------------------------------

    @contextmanager
    def one_look(self) -> Iterator[None]:
        """Answer the reads made inside (:meth:`find`, :meth:`outstanding`,
        :meth:`take_back_reruns`, :meth:`start_queue`) from one look at the server.

        A look is one ``status`` request; the queue and the history are fetched again only when
        the status says they changed since they were last fetched. Outside this block each read
        takes a look of its own. A change this sink makes (an item added or removed, the queue
        started) ends the look, so the next read looks again. A caller that reads several times
        in a row (the daemon, every quarter second, for each of its agents) asks the manager
        once instead of once a read: it is shared by the beamline's operators and their GUIs.
        """
        self._round, self._look = True, None
        try:
            yield
        finally:
            self._round, self._look = False, None

    def _view(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(status, queue)``: the open look's, else a new look (the queue fetched only when the
        status names another queue or running item than the last ``queue_get`` answer held)."""
        if self._look is not None:
            return self._look
        status, queue = self.status(), self._queue
        marks = (status.get("plan_queue_uid"), status.get("running_item_uid"))  # None: a server that has none
        if queue is None or marks[0] is None or marks != (queue.get("plan_queue_uid"),
                                                          (queue.get("running_item") or {}).get("item_uid")):
            queue = self._queue = self._send("queue_get")
        if self._round:
            self._look = (status, queue)
        return status, queue

    def current_status(self) -> dict[str, Any]:
        """The manager's status: the open look's (:meth:`one_look`), else a new look's."""
        return dict(self._view()[0])

    def _changed(self) -> None:
        """This sink changed the queue: the open look is out of date."""
        self._look = None

    def _history_index(self, status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Key -> last history item, fetched again only when ``status`` names another history
        than the one held (it can be long)."""
        if status.get("plan_history_uid") != self._history_uid or self._history_uid is None:
            response = self._send("history_get")
            self._history = {}
            for item in response["items"]:
                key = _item_key(item)
                if key is not None:
                    self._history[key] = item
            self._history_uid = response["plan_history_uid"]
        return self._history

    def find(self, key: str) -> dict[str, Any] | None:
        """Where the item carrying idempotency key ``key`` is on the server, if anywhere.

        Looks in the queue, the running item, then the history: the order items move in, so an
        item that moves on during the look is still found.

        Returns
        -------
        dict | None
            ``{"where": "queue" | "running" | "history", "item_uid": str, "item": dict,
            "exit_status": str | None}`` (``exit_status``: ``"completed"``, ``"failed"``,
            ``"stopped"``, ``"aborted"``, ... for a finished item, else ``None``); ``None`` if
            no item carries ``key``.
        """
        status, queue = self._view()
        for item in queue["items"]:
            if _item_key(item) == key:
                return {"where": "queue", "item_uid": item["item_uid"], "item": item, "exit_status": None}
        running = queue.get("running_item") or {}
        if _item_key(running) == key:
            return {"where": "running", "item_uid": running["item_uid"], "item": running,
                    "exit_status": None}
        done = self._history_index(status).get(key)
        if done is not None:
            result = done.get("result") or {}
            return {"where": "history", "item_uid": done["item_uid"], "item": done,
                    "exit_status": result.get("exit_status")}
        return None

    def take_back_reruns(self, agent: str) -> list[tuple[str, dict[str, Any]]]:
        """Remove from the queue the items of ``agent`` that have run already.

        An RE Manager restarted while it ran an item puts that item back in its queue, and its
        history holds the cut-short run (``failed``); so does an abort, and a plan that raised.
        Started again, the item would repeat its plan from the first point, wherever the
        interruption left the axes: moves no safety gate has checked from there. Such items are removed instead, so the agent asks again from what
        it has measured (and its request, found in the history, is never queued again).

        Returns
        -------
        list of (str, dict)
            The request key and the earlier run's history item of each item removed.

        Raises
        ------
        StreamError
            The manager refused a removal (the item started in the meantime, say).
        """
        with self._lock:
            status, queue = self._view()
            queued = [i for i in queue["items"] if _item_agent(i) == agent]
            if not queued:
                return []
            history = self._history_index(status)
            taken: list[tuple[str, dict[str, Any]]] = []
            for item in queued:
                key = _item_key(item)
                if key is None or key not in history:
                    continue
                try:
                    self._changed()
                    self._call("item_remove", uid=item["item_uid"])
                except self._api.RequestFailedError as ex:
                    raise StreamError(f"queue server at {self.address} would not remove item {item['item_uid']} "
                                      f"(request {key!r}, put back in the queue after its run was cut short): "
                                      f"{_reason(str(ex))}; remove it before starting the queue") from ex
                taken.append((key, history[key]))
            return taken

    def submit(self, request: PlanRequest) -> str:
        """Queue ``request`` unless an item with its key is already queued, running or done.

        An item that ran and failed is not queued again either: :meth:`find` gives its exit
        status, and a retry is a new request with a new key.

        Returns
        -------
        str
            The uid of the queue item: the new one, or the one already carrying the key.

        Raises
        ------
        QueueItemRejectedError
            The manager refused the item (a plan or device its permissions do not allow, or
            arguments that do not fit the plan).
        QueueServerUnreachableError
            No answer. The item may have been added before the answer was lost: submitting the
            same request again is safe, since its key is looked for first.
        """
        with self._lock:
            if request.key in self._sent:
                return self._sent[request.key]
            found = self.find(request.key)
            if found is not None:
                self._sent[request.key] = found["item_uid"]
                return str(found["item_uid"])
            data = request.to_dict()
            item = {
                "item_type": "plan", "name": data["plan"], "args": data["args"], "kwargs": data["kwargs"],
                "meta": {REQUEST_META_KEY: request.key, AGENT_META_KEY: request.agent},
            }
            try:
                self._changed()
                response = self._call("item_add", item)
            except self._api.RequestFailedError as ex:
                raise QueueItemRejectedError(self.address, request, _reason(str(ex)),
                                             self._hint(request)) from ex
            uid = str(response["item"]["item_uid"])
            self._sent[request.key] = uid
            return uid

    def check_request(self, request: PlanRequest) -> str | None:
        """Why the manager would refuse ``request`` as a queue item: its plan not allowed for the
        user group, or keyword arguments the plan does not take. ``None``: it would take it.
        Nothing is queued (what a check before a beamtime needs).

        Raises
        ------
        QueueServerUnreachableError
            No answer.
        """
        try:
            allowed = self._call("plans_allowed", user_group=self.user_group)["plans_allowed"]
        except self._api.RequestFailedError as err:  # e.g. a user group it does not know
            return (f"the manager refuses to list the plans of user group {self.user_group!r} ({_reason(str(err))}); "
                    "set queueserver.user_group to one of its groups (its user_group_permissions.yaml)")
        if request.plan not in allowed:
            return f"plan {request.plan!r} is not allowed. {self._allowed_text(allowed)}"
        params = allowed[request.plan].get("parameters", [])
        if any((p.get("kind") or {}).get("name") == "VAR_KEYWORD" for p in params):
            return None  # takes any keyword
        names = [p["name"] for p in params]
        extra = sorted(set(request.kwargs) - set(names))
        if extra:
            return f"plan {request.plan!r} takes no argument(s) {extra}; its parameters are {names}"
        return None

    def _hint(self, request: PlanRequest) -> str:
        try:
            allowed = self._call("plans_allowed", user_group=self.user_group)["plans_allowed"]
        except (StreamError, self._api.RequestFailedError):
            return "Ask only for plans the RE Manager's user group permissions allow, with their arguments"
        if request.plan in allowed:
            names = [p["name"] for p in allowed[request.plan].get("parameters", [])]
            return f"Check the arguments against the plan's parameters {names}"
        return self._allowed_text(allowed)

    def _allowed_text(self, allowed: Mapping[str, Any]) -> str:
        group = f" for group {self.user_group!r}" if self._via_zmq else ""
        if not allowed:  # a manager learns its plans from the startup code, when an environment opens
            return (f"The RE Manager allows no plans{group}: if its RE environment has never been opened, "
                    "open it once ('qserver environment open') so it learns the startup code's plans; "
                    "else check its user group permissions")
        return f"Plans allowed{group}: {sorted(allowed)}"

    def outstanding(self, agent: str) -> int:
        """How many items of ``agent`` are queued or running now."""
        _, queue = self._view()
        items = [*queue["items"], *([queue["running_item"]] if queue.get("running_item") else [])]
        return sum(_item_agent(item) == agent for item in items)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the API's background threads and close its connections."""
        close_api(self._api)
