"""``labkit lab``: JupyterLab on the notebooks folder, started wherever JupyterLab can start.

Unknown command-line arguments go to JupyterLab unchanged (``labkit lab --no-browser
--port 8890``). As root, JupyterLab refuses to start without ``--allow-root``; labkit adds
it and says so. JupyterLab's own log is passed through to stderr, and the first URL it
announces is printed once more on stdout as ``labkit: JupyterLab at URL``, so a script or
a user scrolling past the log finds it.

The kernel status JupyterLab shows stays "Busy" while a cell runs. JupyterLab
(>= 4.4) sends widget comms over kernel subshells and asks the kernel for a new subshell
(``create_subshell_request`` on the control channel) when a widget of a new kind appears,
e.g. a live board shown mid-cell. The kernel answers that request with its own busy/idle
pair, and JupyterLab showed that "idle" for the rest of the running cell (seen in the
browser test: Idle from the board's first display to the end of training). JupyterLab
ignores the status of message types that jupyter_server lists as untracked (no user
activity; ``debug_request`` is there already), so labkit adds the subshell messages to
that list. Under plain ``jupyter lab`` pass the same option (see :data:`SUBSHELL_MESSAGES`).

Live boards need more: with comms over subshells (JupyterLab's default
``commsOverSubshells: "perCommTarget"``), a ``FigureWidget`` updated by a running cell was
never redrawn, not even after the cell (browser probe: 0 of 50 updates drawn; the same cell
with the setting "disabled" drew every update, one every 0.5 s). A later run of the browser
test with the setting back on (and the untracked subshell messages kept) did see the board
drawn live, so this may depend on timing; until that is settled labkit lab
starts JupyterLab with that setting "disabled" as an application default (an
``overrides.d`` file in a temporary copy of JupyterLab's app settings folder, removed at
exit; the user's own settings still win): widget messages then wait for the running cell,
as before JupyterLab 4.4. Under plain ``jupyter lab`` choose Settings > Kernel > "Kernel
Comms over subshells" > Disabled.

The same override answers JupyterLab's first-start question "get notified about official
Jupyter news?" with no (``@jupyterlab/apputils-extension:notification`` ``fetchNews``
"false", ``checkForUpdates`` false): it interrupts a class's first look at a notebook.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_URL = re.compile(r"(https?://[^\s]+/lab[^\s]*)")
UNTRACKED = "--MappingKernelManager.untracked_message_types"
# control-channel messages of kernel subshells: no user activity, so no kernel status change
SUBSHELL_MESSAGES = ["create_subshell_request", "create_subshell_reply",
                     "delete_subshell_request", "delete_subshell_reply",
                     "list_subshell_request", "list_subshell_reply"]


def untracked_messages() -> list[str]:
    """jupyter_server's default untracked message types plus the subshell messages."""
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

    default = MappingKernelManager.class_traits()["untracked_message_types"]
    return list(dict.fromkeys([*default.make_dynamic_default(), *SUBSHELL_MESSAGES]))


APP_SETTINGS = "--LabApp.app_settings_dir"
NO_SUBSHELL_COMMS = {"@jupyterlab/apputils-extension:kernels-settings":
                     {"commsOverSubshells": "disabled"}}
# No "get notified about official Jupyter news?" toast at the first start (fetchNews "none"
# means ask), and no update check (it needs the network): a lab, not a news reader.
NO_NEWS = {"@jupyterlab/apputils-extension:notification":
           {"fetchNews": "false", "checkForUpdates": False}}
OVERRIDES = {**NO_SUBSHELL_COMMS, **NO_NEWS}


def app_settings(target: Path) -> Path:
    """A copy of JupyterLab's app settings folder in ``target`` plus
    ``overrides.d/labkit.json`` (:data:`OVERRIDES`): comms over subshells off, and no
    Jupyter news prompt or update check."""
    from jupyterlab.commands import get_app_dir

    original = Path(get_app_dir()) / "settings"
    if original.is_dir():
        shutil.copytree(original, target, dirs_exist_ok=True)
    (target / "overrides.d").mkdir(parents=True, exist_ok=True)
    (target / "overrides.d" / "labkit.json").write_text(json.dumps(OVERRIDES, indent=1))
    return target


def command(folder: Path, extra: list[str],
            settings_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """The argv that starts JupyterLab, and notes on what labkit added to it. Given
    ``settings_dir`` (an empty folder), JupyterLab's app settings go there (see above)."""
    argv = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={folder}", *extra]
    notes = []
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if is_root and "--allow-root" not in extra:
        argv.append("--allow-root")
        notes.append("running as root: added --allow-root (JupyterLab refuses root without it)")
    if not any(a.startswith(UNTRACKED) for a in extra):  # the user's own list wins
        argv += [f"{UNTRACKED}={m}" for m in untracked_messages()]
        notes.append("kernel subshell messages do not change the kernel status shown "
                     "(JupyterLab showed Idle while a cell with a live board ran)")
    if settings_dir is not None and not any(a.startswith(APP_SETTINGS) for a in extra):
        argv.append(f"{APP_SETTINGS}={app_settings(Path(settings_dir))}")
        notes.append("widget comms over kernel subshells off by default (live plots were "
                     "seen not to redraw while a cell ran), and no Jupyter news prompt; your "
                     "own JupyterLab settings win")
    return argv, notes


def lab(folder: Path, extra: list[str], popen=subprocess.Popen) -> int:
    """Run JupyterLab until it exits; return its exit code (130 after Ctrl-C)."""
    with tempfile.TemporaryDirectory(prefix="labkit-lab-settings-") as settings:
        return _lab(folder, extra, popen, Path(settings))


def _lab(folder: Path, extra: list[str], popen, settings: Path) -> int:
    argv, notes = command(folder, extra, settings)
    for note in notes:
        print(f"labkit: {note}", flush=True)
    shown = [a for a in argv[3:] if not a.startswith((UNTRACKED, APP_SETTINGS))]  # in notes
    print(f"labkit: starting jupyter lab {' '.join(shown)}", flush=True)
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
