"""A search stopped before its end, on purpose (Ctrl-C, SIGTERM) or because its storage filled up or went read-only,
the way Ray Tune stops on Ctrl-C: its trials keep their last checkpoints and `tune.py --resume NAME` goes on.

Ray Tune's `Tuner.fit` stops gracefully on SIGINT and SIGUSR1: it leaves its loop, saves the experiment state (every
trial's last checkpoint, the searcher, the callbacks), stops the running trials (a few seconds at most) and ends the
callbacks (the MLflow callback ends each running trial's run KILLED, tagged `interrupted`). `SearchStop` sends the
user's Ctrl-C, a SIGTERM (SLURM's time limit, a spot instance reclaimed, `kill`) and a storage failure down that one
path: Ray logs a failed write to the storage (a trial's checkpoint, its own experiment state) and would go on with
every later write failing; the stop ends the search instead, with one line naming the storage and the fix.

While stopping, MLflow calls are retried for `STOP_RETRY_S` at most before they wait in the search's queue (resume
logs them), so a stop takes seconds whatever the tracking server does. A second Ctrl-C stops at once, as a kill does
(the last saved state is older then); a second SIGTERM is ignored (a batch system's repeat, not a user's).
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import pickletools
import re
import shlex
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ray.tune import Callback

from trainables.errors import UserError
from trainables.tracking.ranking import INTERRUPTED, outcome, reported_failure
from trainables.tracking.state import read_state, storage_error, storage_lost, storage_root, write_state

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports a process it ended
STOP_RETRY_S = 10.0  # MLflow's retry window while stopping: a stop is bounded whatever the server does
SAVE_WAIT_S = 30.0  # how long a stop waits for the checkpoints in flight (reported, not yet registered by Ray)
_FILENAME = re.compile(r"\[Errno \d+\] [^:\n]+: '(/[^']+)'")  # the file an OSError names (str(OSError))


class SearchStop:
    """The reason a search is stopping (a signal or the storage), and the handlers that start the stop."""

    current: SearchStop | None = None  # the one of the search running in this process (`SavedFirst` reads it)

    def __init__(self, storage: str, mlflow, debug: bool = False):
        self.storage, self.mlflow, self.debug = storage, mlflow, debug
        self.signal: int | None = None  # the signal that stopped the search
        self.storage_failure: str | None = None  # or the storage's error, in Ray's words
        self.at: dt.datetime | None = None
        self.watched = False  # the search has `SavedFirst`: it starts Ray's stop once checkpoints in flight landed
        self.pending = False  # requested, Ray's stop not started yet

    @property
    def requested(self) -> bool:
        return self.at is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 2)  # the storage: a problem to fix first, as every storage error is

    @contextmanager
    def installed(self):
        """SIGINT and SIGTERM stop the search gracefully, and Ray's log of a failed storage write stops it, for the
        block (Tuner.fit). Ray leaves SIGINT to us (TUNE_DISABLE_SIGINT_HANDLER); it always handles SIGUSR1."""
        before = {number: signal.getsignal(number) for number in EXIT_CODES}
        disabled = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        handlers = logging.getLogger("ray").handlers
        watch = _RayLogWatch(self)
        SearchStop.current = self
        for number in EXIT_CODES:
            signal.signal(number, self._on_signal)
        for handler in handlers:
            handler.addFilter(watch)
        try:
            yield self
        finally:
            SearchStop.current = None
            for handler in handlers:
                handler.removeFilter(watch)
            for number, handler in before.items():
                signal.signal(number, handler)
            if disabled is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = disabled

    def _on_signal(self, number: int, frame) -> None:
        if self.requested:
            if number == signal.SIGINT and self.signal == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now, as a kill would
            return
        self.signal = number
        print(f"\n{signal.Signals(number).name} received: stopping the search (the trials keep their last "
              f"checkpoints){'; Ctrl-C again stops at once' if number == signal.SIGINT else ''}", flush=True)
        self._stop()

    def storage_failed(self, text: str) -> None:
        """Ray could not write to the storage (full or read-only): stop, once."""
        if not self.requested:
            self.storage_failure = text
            self._stop()

    def note_storage_failure(self, error: BaseException) -> bool:
        """Whether `error`, raised out of Tuner.fit, is (or follows) the storage failing; then it is the reason."""
        chain, seen = [], error
        while seen is not None and len(chain) < 10:
            chain.append(str(seen))
            seen = seen.__cause__ or seen.__context__
        if self.storage_failure is None and not storage_lost("\n".join(chain)):
            return False
        self.storage_failure = self.storage_failure or "\n".join(chain)
        self.at = self.at or dt.datetime.now()
        return True

    def _stop(self) -> None:
        self.at = dt.datetime.now()
        self.mlflow.retry_s = min(self.mlflow.retry_s, STOP_RETRY_S)
        self.pending = True
        if not self.watched:  # a search saved before `SavedFirst` existed: Ray's stop at once
            self.start_ray_stop()

    def start_ray_stop(self) -> None:
        if self.pending:
            self.pending = False
            signal.raise_signal(signal.SIGUSR1)  # Ray Tune's graceful stop (ray/tune/tune.py _setup_signal_catching)

    def storage_problem(self, resume: str) -> UserError:
        """The one line for a storage failure: the path, the kind and the fix (with the command `resume`)."""
        text = self.storage_failure or ""
        lines = [line.strip() for line in text.splitlines() if storage_lost(line)]
        error = OSError(re.sub(r"^(\w+Error: )+", "", lines[-1] if lines else text.strip())[:300])
        root = self.storage.split("://", 1)[-1].rstrip("/")
        elsewhere = [path for path in _FILENAME.findall(text) if root not in path]  # OSError's own `: 'path'`
        if elsewhere:  # a local disk (Ray's session folder, the temp folder), not the storage
            problem = str(storage_error(elsewhere[0], error)).replace("Cannot use --storage ", "Cannot write to ", 1)
        else:
            problem = str(storage_error(self.storage, error))
        return UserError(problem.replace("tune.py --resume NAME", resume))


def _whole(data: bytes, name: str) -> bool:
    """Whether a state file Ray wrote reads to its end: JSON parses; a pickle's opcodes run to its STOP (walked by
    pickletools, never unpickled: nothing in it is executed here)."""
    try:
        if name.endswith(".json"):
            json.loads(data)
        else:
            for _ in pickletools.genops(data):
                pass
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def put_back_ray_state(experiment: str) -> str | None:
    """Ray's saved experiment state and its searcher's, put back from the copy Ray keeps on this machine when the
    storage's copy was cut short (a storage that filled up while Ray overwrote them in place): Tuner.restore would
    log the error and start the search afresh, or fail on the searcher's pickle. Which copy was put back; None when
    the storage's copies read. UserError when they cannot be put back."""

    import pyarrow.fs

    fs, folder = pyarrow.fs.FileSystem.from_uri(experiment)
    files = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    newest = {}  # the newest experiment state and searcher state: what Tuner.restore reads
    for prefix, suffix in (("experiment_state-", ".json"), ("searcher-state-", ".pkl")):
        found = [info for info in files if info.base_name.startswith(prefix) and info.base_name.endswith(suffix)]
        if found:
            newest[prefix] = max(found, key=lambda info: info.base_name)
    if "experiment_state-" not in newest:
        return None
    damaged = []
    for info in newest.values():
        try:
            with fs.open_input_stream(info.path) as handle:
                whole = _whole(handle.read(), info.base_name)
        except OSError:
            whole = False
        if not whole:
            damaged.append(info)
    if not damaged:
        return None
    root = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    state = newest["experiment_state-"].base_name
    for copy in sorted(glob.glob(f"{root}/ray/session_*/artifacts/*/{name}/driver_artifacts/{state}")):
        local = os.path.dirname(copy)
        if not all(os.path.isfile(os.path.join(local, info.base_name))
                   and _whole(Path(local, info.base_name).read_bytes(), info.base_name) for info in newest.values()):
            continue
        for file in os.listdir(local):  # the state, the searcher's and the callbacks' (not the trials' folders)
            if os.path.isfile(os.path.join(local, file)):
                with open(os.path.join(local, file), "rb") as source, fs.open_output_stream(f"{folder}/{file}") as out:
                    out.write(source.read())
        return local
    raise UserError(f"Ray's saved state of this search ({damaged[0].path}) was cut short, as a full storage does, and "
                    "this machine has no whole copy of it; resume on the machine that ran the search, or start it again")


def failed_on_storage(experiment: str) -> list[str]:
    """The trials Ray saved as ERROR (`experiment`: its folder) because the storage failed under them: a resume trains
    them on from their last checkpoint (Ray's `resume_errored`, which gives the search's other errored trials, those
    that crashed `max_failures` times, one more go too)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(experiment).trials
    except (ValueError, OSError):  # nothing saved yet: Tuner.restore says so
        return []
    return [trial.trial_id for trial in trials if trial.status == "ERROR" and storage_lost(_error_text(trial))]


def _error_text(trial) -> str:
    """The error a trial was saved with; an error file the full storage cut short counts as the storage's."""
    try:
        return str(trial.get_pickled_error() or "")
    except (EOFError, OSError, ValueError):
        return "No space left on device (the trial's error file is cut short)"


class SavedFirst(Callback):
    """Starts Ray's graceful stop, once one is requested, when no trial has a checkpoint in flight (or after
    `SAVE_WAIT_S`): Ray saves its experiment state at once when it stops, so a checkpoint a trial has reported but
    Ray has not yet registered would be missing from it and the trial would redo that epoch on --resume."""

    def setup(self, **info):
        if SearchStop.current is not None:
            SearchStop.current.watched = True

    def on_step_end(self, iteration, trials, **info):
        stop = SearchStop.current
        if stop is not None and stop.pending and (
                not any(trial.is_saving for trial in trials)
                or (dt.datetime.now() - stop.at).total_seconds() > SAVE_WAIT_S):
            stop.start_ray_stop()


class _RayLogWatch(logging.Filter):
    """Sees every record Ray logs: a failed write to a full or read-only storage starts the stop (and is not shown:
    the stop ends with one line); once stopping, Ray's own lines about it (its `Tuner.restore(...)` hint, the trials
    that did not complete, a state it could not save) are not shown either, unless --debug."""

    def __init__(self, stop: SearchStop):
        super().__init__()
        self.stop = stop

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + str(record.exc_info[1])
        if storage_lost(text):
            self.stop.storage_failed(text)
        return self.stop.debug or not (self.stop.requested and record.levelno <= logging.ERROR)


def interrupted_state(stop: SearchStop, results, max_t: int, num_samples: int | None, queued: int,
                      resume: str) -> dict:
    """What the state file keeps of a stop: when and why, the trials it left, and what `resume` will do."""
    epochs = {r.metrics["trial_id"]: int(r.metrics["training_iteration"])
              for r in results if r.metrics and r.metrics.get("training_iteration")}
    ended = {r.metrics["trial_id"]: outcome(epochs[r.metrics["trial_id"]], max_t,
                                            r.error is not None or reported_failure(r.metrics) is not None,
                                            marked_done=bool(r.metrics.get("done")))
             for r in results if r.metrics and r.metrics.get("trial_id") in epochs}
    stopped = sorted(trial for trial, how in ended.items() if how == INTERRUPTED)
    unreported = len(results) - len(ended)  # started without an epoch yet, or waiting to start
    steps = [f"restarts {_count(len(stopped), 'interrupted trial')} from the last checkpoint ("
             + ", ".join(f"{trial}: epoch {epochs[trial]}/{max_t}" for trial in stopped) + ")"] if stopped else []
    steps += [f"starts {_count(unreported, 'trial')} that had not finished an epoch from scratch"] if unreported else []
    if num_samples is None:
        steps.append("proposes new trials until the time budget is spent")
    elif num_samples > len(results):
        steps.append(f"proposes the {_count(num_samples - len(results), 'trial')} not yet proposed")
    queue = f"first logs the {_count(queued, 'MLflow call')} queued, then " if queued else ""
    return {"by": signal.Signals(stop.signal).name if stop.signal else "storage failure",
            "at": stop.at.isoformat(timespec="seconds"), "trials_ended": len(ended) - len(stopped),
            "trials_interrupted": stopped, "trials_without_an_epoch": unreported, "resume": resume,
            "resume_does": queue + (", ".join(steps) or "closes the search")}


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'s' if number != 1 else ''}"


def end_stopped(stop, results, space, args, name: str, mlflow, parent_id: str) -> int:
    """A search stopped by a signal or its storage: the parent run ended KILLED (its trials' runs are, by the
    callback), the state file says what `--resume` will do, one line gives that command; the exit code says why."""
    from mlflow.entities import RunTag

    from trainables.tracking.names import TAG_OUTCOME

    mlflow.log_batch(parent_id, tags=[RunTag(TAG_OUTCOME, INTERRUPTED)])
    mlflow.set_terminated(parent_id, status="KILLED")
    mlflow.flush()  # one try: what MLflow did not take waits on disk, and --resume logs it first
    resume = resume_command(name, args)
    record = interrupted_state(stop, results, space.max_t, space.num_samples, len(mlflow.queue), resume)
    if stop.storage_failure is not None:  # one line: what failed and the fix, this resume command included
        raise stop.storage_problem(resume)
    write_state(args.storage, name, {**(read_state(args.storage, name) or {}), "interrupted": record})
    seconds = (dt.datetime.now() - stop.at).total_seconds()
    print(f"\nstopped {seconds:.0f} s after {record['by']}: {record['trials_ended']} trials ended, "
          f"{len(record['trials_interrupted'])} interrupted, {record['trials_without_an_epoch']} without an epoch; "
          f"resume with:  {resume}")
    return stop.exit_code


def resume_command(name: str, args) -> str:
    """The command that goes on with an interrupted search (the flags a resume needs again)."""
    flags = [("--storage", storage_root(args.storage)), ("--address", args.address)]
    return f"python tune.py --resume {shlex.quote(name)}" + "".join(
        f" {flag} {shlex.quote(value)}" for flag, value in flags if value)
