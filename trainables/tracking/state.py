"""A search's state file beside Ray's own (`<storage>/<name>/medtune_search.yaml`): what `--resume` needs, and
the one record of the time budget spent (`BudgetClock`, `record_budget`, `budget_spent`). Beside it, the MLflow calls
queued while the tracking server is away (`mlflow_queue.jsonl`, one JSON record a line, read by `read_queue`).

Local folders, s3:// and gs:// alike, through pyarrow (as Ray stores results). Every storage failure is a
UserError that says which kind it is (permission, credentials, missing bucket, unreachable), checked before
Ray starts.
"""

from __future__ import annotations

import errno
import re
import uuid
from pathlib import Path

import yaml

from trainables.errors import UserError

STATE_FILE = "medtune_search.yaml"
QUEUE_FILE = "mlflow_queue.jsonl"  # what MLflow has not got yet (trainables.tracking.resilient)
_KINDS = (  # (errno values, words in the storage library's message, what the user should do)
    ({errno.ENOSPC, errno.EDQUOT}, ("no space left", "quota exceeded", "disk full"),
     "the storage is full; free space (or raise the quota), then `tune.py --resume NAME` goes on where it stopped"),
    ({errno.EROFS}, ("read-only file system",),
     "the storage is read-only; remount it writable or pass another --storage, then resume with `tune.py --resume NAME`"),
    ({errno.EACCES, errno.EPERM}, ("accessdenied", "access denied", "permission", "forbidden", "403"),
     "permission denied; use a location you can write to, or ask for write access"),
    (set(), ("credential", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken", "security token",
             "unauthenticated", "401"),
     "the cloud credentials were refused or are missing; set them (e.g. AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)"),
    (set(), ("nosuchbucket", "bucket does not exist", "bucket not found", "the specified bucket"),
     "the bucket does not exist; create it or fix the name"),
    ({errno.ENOTDIR, errno.EEXIST}, ("not a directory", "file exists"),
     "a file is in the way; pass a folder path"),
    ({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT},
     ("connection", "resolve", "timed out", "curl", "unreachable", "network"),
     "the storage is unreachable; check the address and the network"),
)


def storage_root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _message(error: OSError) -> str:
    """The library's words without the paths it quotes: a path or a timestamp in it (`smoke-20261207-071403`)
    must not read as a status code."""
    return re.sub(r"\S*[/\\]\S*", " ", str(error)).lower()


def _says(message: str, word: str) -> bool:
    """A status code counts as a whole number only ("403", not the 403 of "071403")."""
    return re.search(rf"(?<!\d){word}(?!\d)" if word.isdigit() else re.escape(word), message) is not None


def storage_lost(text: str) -> bool:
    """Whether an error's text says a storage filled up or went read-only mid-search (the first two kinds above):
    what Ray reports of a failed checkpoint or experiment-state write, where the errno is gone."""
    message = re.sub(r"\S*[/\\]\S*", " ", text).lower()
    return any(_says(message, word) for _, words, _ in _KINDS[:2] for word in words)


def storage_error(storage: str, error: OSError) -> UserError:
    """One line naming the storage, the kind of failure and the fix."""
    message = _message(error)
    advice = next((fix for numbers, words, fix in _KINDS
                   if error.errno in numbers or any(_says(message, word) for word in words)),
                  "check the --storage location and your access to it")
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return UserError(f"Cannot use --storage {storage}: {advice} ({type(error).__name__}: {detail})")


def _location(storage: str, relative: str):
    """(filesystem, path) of `relative` under the storage root."""
    import pyarrow.fs

    base, _, query = storage_root(storage).partition("?")  # s3://bucket/x?endpoint_override=...
    try:
        return pyarrow.fs.FileSystem.from_uri(f"{base.rstrip('/')}/{relative}" + (f"?{query}" if query else ""))
    except (OSError, ValueError) as error:
        raise storage_error(storage, OSError(str(error))) from error


def check_storage(storage: str) -> None:
    """Write and delete a probe file under the storage root, so a storage problem shows before any compute."""
    import pyarrow.fs

    fs, path = _location(storage, f".medtune-probe-{uuid.uuid4().hex}")
    root = path.rsplit("/", 1)[0]
    try:
        created = fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound
        fs.create_dir(root)
        with fs.open_output_stream(path) as handle:
            handle.write(b"probe")
        fs.delete_file(path)
        if created:  # leave nothing behind: a later check may still stop the search
            fs.delete_dir(root)
    except OSError as error:
        raise storage_error(storage, error) from error


def read_state(storage: str, name: str) -> dict | None:
    """The state `write_state` left for search `name`; None when there is no such search."""
    fs, path = _location(storage, f"{name}/{STATE_FILE}")
    try:
        with fs.open_input_stream(path) as handle:
            return yaml.safe_load(handle.read())
    except FileNotFoundError:
        return None
    except OSError as error:
        if "not found" in str(error).lower() or "no such file" in str(error).lower():
            return None
        raise storage_error(storage, error) from error


def write_state(storage: str, name: str, state: dict) -> None:
    _write(storage, f"{name}/{STATE_FILE}", yaml.safe_dump(state, sort_keys=False).encode())


def _write(storage: str, relative: str, data: bytes) -> None:
    """Written beside, then moved over the old file: a storage that fills up mid-write leaves the old one whole
    (writing in place would cut it short: the search could no longer be resumed)."""
    fs, path = _location(storage, relative)
    beside = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    try:
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_output_stream(beside) as handle:
            handle.write(data)
        fs.move(beside, path)
    except OSError as error:
        try:
            fs.delete_file(beside)
        except OSError:
            pass  # never made, or the storage refuses even that
        raise storage_error(storage, error) from error


def queue_path(storage: str, name: str) -> str:
    return f"{storage_root(storage).rstrip('/')}/{name}/{QUEUE_FILE}"


def read_queue(storage: str, name: str) -> list[str]:
    """The queued records of search `name`, oldest first (a line cut short by a crash mid-write is dropped)."""
    fs, path = _location(storage, f"{name}/{QUEUE_FILE}")
    try:
        with fs.open_input_stream(path) as handle:
            lines = handle.read().decode().split("\n")
    except FileNotFoundError:
        return []
    except OSError as error:
        if "not found" in str(error).lower() or "no such file" in str(error).lower():
            return []
        raise storage_error(storage, error) from error
    return [line for line in lines[:-1] if line]  # every complete record ends with a newline


def append_queue(storage: str, name: str, record: str) -> None:
    """Add one record (a line of JSON) at the end: appended where the storage can, else the file is rewritten."""
    fs, path = _location(storage, f"{name}/{QUEUE_FILE}")
    try:
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_append_stream(path) as handle:
            handle.write(f"{record}\n".encode())
        return
    except NotImplementedError:  # object stores (s3://, gs://) cannot append
        pass
    except OSError as error:
        if "not supported" not in str(error).lower() and "not implemented" not in str(error).lower():
            raise storage_error(storage, error) from error
    write_queue(storage, name, [*read_queue(storage, name), record])


def write_queue(storage: str, name: str, records: list[str]) -> None:
    """Replace the queue with `records`; an empty queue is no file."""
    if records:
        _write(storage, f"{name}/{QUEUE_FILE}", "".join(f"{record}\n" for record in records).encode())
        return
    fs, path = _location(storage, f"{name}/{QUEUE_FILE}")
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        if "not found" not in str(error).lower() and "no such file" not in str(error).lower():
            raise storage_error(storage, error) from error


class BudgetClock:
    """The time a search has spent of its budget, counted as Ray Tune's TimeoutStopper counts it (the stopper
    `TuneConfig(time_budget_s=...)` makes): from its first tick, across runs. Ray saves its stopper with the
    experiment state and a resume restores the budget that was left; the MLflow callback saves this clock at the
    same moment (`Callback.get_state`), so after a resume both go on from the same point. The time between Ray's
    last save and a kill counts for neither. Ticks are no earlier than Ray's, so the clock is spent once Ray's is."""

    def __init__(self, budget_s: float | None):
        self.budget_s, self.used_s, self._last = budget_s, 0.0, None

    def tick(self, now: float) -> None:
        if self._last is not None:
            self.used_s += now - self._last
        self._last = now

    @property
    def spent(self) -> bool:
        """Whether Ray stopped the running trials for the budget: they were cut by it."""
        return self.budget_s is not None and self.used_s >= self.budget_s

    def get_state(self) -> dict:
        return {"used_s": self.used_s}

    def set_state(self, state: dict) -> None:
        self.used_s, self._last = float(state["used_s"]), None  # as Ray's restored stopper: counting at the next tick


def record_budget(storage: str, name: str, clock: BudgetClock) -> None:
    """Keep the clock's decision in the search's state file, where tune.py's summary and ranking read it."""
    state = read_state(storage, name) or {}
    write_state(storage, name, {**state, "budget": {"used_s": round(clock.used_s, 3), "spent": clock.spent}})


def budget_spent(state: dict | None, budget_s: float | None, run_s: float) -> tuple[float, bool]:
    """(seconds used over every run, whether the budget was spent) as the search's last run recorded them. A search
    whose callback was pickled before the record existed counted this run's `run_s` only: so does this answer."""
    record = (state or {}).get("budget")
    if record:
        return float(record["used_s"]), bool(record["spent"])
    clock = BudgetClock(budget_s)
    clock.used_s = run_s
    return run_s, clock.spent
