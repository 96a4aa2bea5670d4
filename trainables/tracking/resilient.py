"""MLflow calls that survive the tracking server going away: retried, then queued on disk, then flushed.

A search's driver logs through one `ResilientClient` (the trial callback, the parent run, `close_search`). Each call
is retried with backoff for `MEDTUNE_MLFLOW_RETRY_S` seconds (default 180); if the server is still away, the call and
every later one go to a queue beside the search's state file (`<storage>/<name>/mlflow_queue.jsonl`, a JSON record a
line, in call order), so a driver restart loses nothing. Each later call first tries the queue (at most once every
`probe_s`, with a cheap question that waits 5 s at most, so a hung server does not hold up the trials), and the end
of a search tries once more for the retry window; one line says when the server went away and one when it is back.
A call the server refuses for good (a 4xx answer: a bug, not an outage) is one line and dropped, never raised: the
trial callback runs inside Ray's controller, and an exception there would end every trial.

Run ids: a trial's run is made by the named operation `create_trial_run` (find the run tagged with the Ray trial id
under the parent, else create it), never by a bare `create_run`. While the server is away, the call returns a
placeholder (`pending:<trial id>`) and every later call for that trial carries it; the flush runs the queued
operation first (records are in order), then puts the real run id in place of the placeholder in the records after
it and in the calls still to come. Because the operation finds before it creates, replaying it (after a crash
mid-flush, or a sync from Ray storage) never makes a second run for a trial. Other named operations (e.g.
`close_search`, logging a checkpoint's files) are queued the same way: a record names a client method or an
operation, never a Python object, so it can wait on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager

import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainables.errors import UserError
from trainables.tracking.state import append_queue, queue_path, read_queue, write_queue

RETRY_ENV = "MEDTUNE_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 180.0
PROBE_TIMEOUT_S = 5  # how long a try of the queue waits for an answer before the search goes on
_ENTITIES = {"Metric": (Metric, ("key", "value", "timestamp", "step")), "Param": (Param, ("key", "value")),
             "RunTag": (RunTag, ("key", "value"))}
WRITES = ("log_batch", "log_artifact", "log_artifacts", "log_dict", "log_metric", "log_param", "set_tag",
          "set_terminated", "update_run", "set_experiment_tag")  # what may wait in the queue (never a read)
_LOCAL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def retry_window() -> float:
    """Seconds a call is retried before it is queued: $MEDTUNE_MLFLOW_RETRY_S, default 180."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return DEFAULT_RETRY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{RETRY_ENV}={text!r} is not a number of seconds >= 0; set it like {RETRY_ENV}=180")
    return value


@contextmanager
def scoped_env(**values: str):
    """Environment variables set for the block only (MLflow reads its HTTP settings from them per request)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def transient(error: Exception) -> bool:
    """Whether `error` may go away by itself: the server unreachable, overloaded or failing (5xx, 429), a timeout,
    a locked local store. An answer that refuses the call (4xx) or an error on this side (a missing file, a bug) is
    not: retrying it would only delay the search."""
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(error, (requests.RequestException, sqlalchemy.exc.OperationalError)):
        return True
    return isinstance(error, OSError) and not isinstance(error, _LOCAL_ERRORS)


def encode(record: dict) -> str:
    def entity(value):
        for name, (kind, fields) in _ENTITIES.items():
            if isinstance(value, kind):
                return {"$entity": name, **{field: getattr(value, field) for field in fields}}
        if isinstance(value, (set, frozenset, tuple)):
            return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        raise TypeError(f"cannot queue a {type(value).__name__}")

    return json.dumps(record, default=entity)


def decode(line: str) -> dict:
    def entity(value: dict):
        if "$entity" in value:
            kind, fields = _ENTITIES[value["$entity"]]
            return kind(*(value[field] for field in fields))
        return value

    return json.loads(line, object_hook=entity)


class _Refused(Exception):
    """The server answered and refused the call: queueing it would only block the queue."""


class ResilientClient:
    """An MlflowClient whose writes never fail the search (see the module docstring). `client.log_batch(...)` and
    the other writes (`WRITES`) and named operations (`client.close_search(...)`) go through `call`; a read that is
    needed at once goes through `attempt`, the raw client is `.client`."""

    def __init__(self, tracking_uri: str, storage: str | None = None, search: str | None = None,
                 operations: dict[str, Callable] | None = None, retry_s: float | None = None,
                 say: Callable[[str], None] | None = None):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.storage, self.search = storage, search
        self.operations = dict(operations or {})
        self.retry_s = retry_window() if retry_s is None else retry_s
        self.say = say or (lambda line: print(line, flush=True))
        self.queue = [decode(line) for line in read_queue(storage, search)] if storage and search else []
        self.resolved: dict[str, str] = {}  # placeholder -> run id, once its operation has run
        self.away_since: float | None = None
        self._last_try = 0.0

    @property
    def probe_s(self) -> float:
        """How often a call made while the server is away tries the queue again."""
        return min(30.0, max(1.0, self.retry_s))

    def __getattr__(self, name: str):
        if not (name in WRITES or name in self.__dict__.get("operations", {})):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    def call(self, method: str, *args, placeholder: str | None = None, **kwargs):
        """Run `method` (an MlflowClient method or a named operation) now, retried for the window; while the server is
        away, queue it and return `placeholder` (None when it has none). Never raises for the server's sake."""
        record = {"method": method, "args": list(args), "kwargs": kwargs, "returns": placeholder}
        if self.queue and not self.flush():
            return self._enqueue(record)
        started = time.time()
        try:
            return self._run(record, self.retry_s)
        except _Refused as refused:
            self.say(f"MLflow refused {method} ({refused}); not logged")
            return None
        except Exception:  # noqa: BLE001 (transient, and the window is over: the server is away)
            self._away(started)
            return self._enqueue(record)

    def attempt(self, function: Callable, *args, **kwargs):
        """`function(mlflow_client, *args)` now, retried for the window, for an answer that is needed at once (it is
        not queued): UserError when the server stays away, the error itself when it refuses."""
        try:
            return self._run({"method": function, "args": list(args), "kwargs": kwargs, "returns": None},
                             self.retry_s)
        except _Refused as refused:
            raise refused.__cause__ from None
        except Exception as error:  # noqa: BLE001 (transient, and the window is over)
            first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise UserError(f"MLflow tracking server {self.tracking_uri} did not answer for {self.retry_s:.0f} s "
                            f"({first})") from error

    def flush(self, wait: bool = False) -> bool:
        """Log the queued calls in order; True when none is left. Without `wait`, one try at most every `probe_s`;
        with it, the server is asked for the whole window (the end of a search: a last chance for the server)."""
        if not self.queue:
            return True
        if not wait and time.time() - self._last_try < self.probe_s:
            return False
        self._last_try, done, since = time.time(), 0, self.away_since
        if self._answers(self.retry_s if wait else 0):
            while done < len(self.queue) and self._replay(self.queue[done]):
                done += 1
        self.queue = [self._resolve(record) for record in self.queue[done:]]
        self._save()
        if self.queue:
            self._away(self._last_try)
            return False
        self.away_since = None
        when = f"since {_clock(since)}" if since else "by an earlier run of the search"
        self.say(f"MLflow is back: logged {done} call{'s' if done != 1 else ''} queued {when}")
        return True

    def _answers(self, window: float) -> bool:
        """Whether the server answers a cheap question (a hung server costs `PROBE_TIMEOUT_S` a try, not a long
        call's timeout), retried for `window`."""
        try:
            self._run({"method": lambda client: client.search_experiments(max_results=1), "args": [], "kwargs": {},
                       "returns": None}, window, timeout_s=PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 (away, or refusing even that: the queue waits either way)
            return False
        return True

    def _replay(self, record: dict) -> bool:
        """One queued record, tried once: True when it is done with (logged, or refused and dropped), False while
        MLflow is away."""
        try:
            self._run(record, 0)
        except _Refused as refused:
            self.say(f"MLflow refused queued {record['method']} ({refused}); dropped")
        except Exception:  # noqa: BLE001 (transient: still away, it stays queued)
            return False
        return True

    def _run(self, record: dict, window: float, timeout_s: float | None = None):
        """One call, retried with backoff (1, 2, 4 ... 30 s) until `window` is over; each try without MLflow's own
        retries, and with a timeout of `timeout_s` (default: the window, within 5-30 s)."""
        timeout_s = timeout_s or min(30.0, max(5.0, self.retry_s))
        deadline, pause = time.time() + window, 1.0
        record = self._resolve(record)
        method = record["method"]
        if callable(method):
            target = lambda: method(self.client, *record["args"], **record["kwargs"])  # noqa: E731
        elif method in self.operations:
            target = lambda: self.operations[method](self.client, *record["args"], **record["kwargs"])  # noqa: E731
        else:
            target = lambda: getattr(self.client, method)(*record["args"], **record["kwargs"])  # noqa: E731
        while True:
            try:
                with scoped_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s))):
                    result = target()
                break
            except Exception as error:  # noqa: BLE001 (sorted below: refused, or retried until the deadline)
                if not transient(error):
                    first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                    raise _Refused(f"{type(error).__name__}: {first}") from error
                if time.time() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(30.0, pause * 2)
        if record["returns"]:
            self.resolved[record["returns"]] = result
        return result

    def _resolve(self, record: dict) -> dict:
        """`record` with the run ids now known in place of their placeholders."""
        def real(value):
            return self.resolved.get(value, value) if isinstance(value, str) else value

        return {**record, "args": [real(a) for a in record["args"]],
                "kwargs": {key: real(value) for key, value in record["kwargs"].items()}}

    def _enqueue(self, record: dict):
        self.queue.append(record)
        if self.storage and self.search:
            try:
                append_queue(self.storage, self.search, encode(record))
            except UserError as error:  # the storage failing too: keep it in memory, the trials go on
                self.say(f"MLflow queue not saved ({error}); kept in memory until MLflow returns")
        return record["returns"]

    def _save(self) -> None:
        if self.storage and self.search:
            try:
                write_queue(self.storage, self.search, [encode(record) for record in self.queue])
            except UserError as error:
                self.say(f"MLflow queue not saved ({error}); kept in memory until MLflow returns")

    def _away(self, since: float) -> None:
        """One line per outage: the first time a call could not be made."""
        if self.away_since is None:
            self.away_since = since
            self.say(f"MLflow unreachable since {_clock(since)}; results are kept in Ray storage and logged when it "
                     "returns")

    def queue_file(self) -> str | None:
        return queue_path(self.storage, self.search) if self.storage and self.search else None


def _clock(when: float) -> str:
    return dt.datetime.fromtimestamp(when).strftime("%H:%M:%S")
