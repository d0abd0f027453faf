"""``labkit lab``: JupyterLab on the notebooks folder, started wherever JupyterLab can start.

Unknown command-line arguments go to JupyterLab unchanged (``labkit lab --no-browser
--port 8890``). As root, JupyterLab refuses to start without ``--allow-root``; labkit adds
it and says so. JupyterLab's own log is passed through to stderr, and the first URL it
announces is printed once more on stdout as ``labkit: JupyterLab at URL``, so a script or
a user scrolling past the log finds it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

_URL = re.compile(r"(https?://[^\s]+/lab[^\s]*)")


def command(folder: Path, extra: list[str]) -> tuple[list[str], list[str]]:
    """The argv that starts JupyterLab, and notes on what labkit added to it."""
    argv = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={folder}", *extra]
    notes = []
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if is_root and "--allow-root" not in extra:
        argv.append("--allow-root")
        notes.append("running as root: added --allow-root (JupyterLab refuses root without it)")
    return argv, notes


def lab(folder: Path, extra: list[str], popen=subprocess.Popen) -> int:
    """Run JupyterLab until it exits; return its exit code (130 after Ctrl-C)."""
    argv, notes = command(folder, extra)
    for note in notes:
        print(f"labkit: {note}", flush=True)
    print(f"labkit: starting jupyter lab {' '.join(argv[3:])}", flush=True)
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    announced = False

    def stop(signum, frame):  # SIGTERM to labkit stops JupyterLab too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            match = None if announced else _URL.search(line)
            if match:
                print(f"labkit: JupyterLab at {match.group(1)}", flush=True)
                announced = True
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
