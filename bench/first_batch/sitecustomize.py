"""Put on PYTHONPATH by bench/nih_scale.py only: in a trial process, writes the time its first training epoch asks
for its first batch to $MEDTUNE_BENCH_FIRST_BATCH/<pid>. Any other process is untouched (a thread waits, idle,
for a module it never imports). Ray's timestamps are whole seconds and its first report comes after the test
split is scored, so the benchmark needs its own clock."""

import os
import sys
import threading
import time

FOLDER = os.environ.get("MEDTUNE_BENCH_FIRST_BATCH")
MODULE = "trainables.training.split_run"


def _patch_when_imported() -> None:
    while getattr(sys.modules.get(MODULE), "train_one_epoch", None) is None:
        time.sleep(0.02)
    module = sys.modules[MODULE]
    original = module.train_one_epoch

    def timed(*args, **kwargs):
        path = os.path.join(FOLDER, str(os.getpid()))
        if not os.path.exists(path):
            with open(path, "w") as file:
                file.write(repr(time.time()))
        return original(*args, **kwargs)

    module.train_one_epoch = timed


if FOLDER:
    threading.Thread(target=_patch_when_imported, daemon=True).start()
