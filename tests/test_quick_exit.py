"""A shardwise process exits without the interpreter's final garbage collections, and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import time

EXIT_SCRIPT = """
import atexit, sys, time, torch
import shardwise.engine, shardwise.presharded
from shardwise.quick_exit import skip_final_collection
if sys.argv[1] == "quick":
    skip_final_collection()
out = open(sys.argv[2], "w")
out.write("buffered, never flushed by hand")  # flushed by the file's teardown at exit
atexit.register(lambda: open(sys.argv[2] + ".atexit", "w").write("later handler ran"))
print(time.monotonic(), flush=True)
"""


def exit_seconds(mode: str, path) -> float:
    proc = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, mode, str(path)], stdout=subprocess.PIPE, text=True)
    before = float(proc.stdout.readline())
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    return time.monotonic() - before


def test_exit_skips_the_final_collections_and_still_runs_handlers_and_flushes(tmp_path):
    plain = exit_seconds("plain", tmp_path / "plain")
    quick = exit_seconds("quick", tmp_path / "quick")
    assert (tmp_path / "quick.atexit").read_text() == "later handler ran"
    assert (tmp_path / "quick").read_text() == "buffered, never flushed by hand"
    # Measured here: 0.5-1.3 s against 0.12-0.15 s. Half is far inside that, and far outside noise.
    assert quick < 0.5 * plain, (quick, plain)
