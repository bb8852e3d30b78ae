"""Prefect's ephemeral API server must not outlive the `kiln` process that started it.

With no PREFECT_API_URL, Prefect starts a uvicorn subprocess on first use (SubprocessASGIServer) and stops it from an
atexit hook. A `kill -9` of kiln runs no atexit hook, and the server ran on as an orphan. So the CLI starts a small
watchdog process next to kiln, and Prefect hands it the server's pid the moment the server process exists; when
kiln's process is gone, however it ended, the watchdog stops the server.

Why a watchdog process rather than the alternatives:
- PR_SET_PDEATHSIG on the server: Prefect's Popen takes no preexec_fn, the signal follows the thread that forked the
  server rather than the process, and it is Linux-only.
- EOF on a pipe from kiln: every fork of kiln (curation pool workers) inherits the write end and delays the EOF, so
  the watchdog polls its parent pid instead (kiln's death reparents it).
- Starting the server outside Prefect and setting PREFECT_API_URL: the URL must be in the environment before Prefect
  is imported, which is before kiln knows whether the user's Prefect profile names a server of its own.

The watchdog runs in its own session, so a Ctrl-C or a terminal hang-up that ends kiln does not end it first. It
imports nothing but the standard library (`python -m kiln_cli.prefect_server PARENT_PID`, pids on stdin).
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5  # how soon after kiln's death the watchdog acts
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long (what Prefect's own stop() waits)


def watch_ephemeral_server() -> None:
    """If this process will use Prefect's ephemeral server, have a watchdog stop it when this process dies.

    Call after Prefect is imported and before anything talks to its API. A configured server (PREFECT_API_URL, in the
    environment or the active profile) is left alone: it is not ours."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    watchdog = subprocess.Popen([sys.executable, "-m", "kiln_cli.prefect_server", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)

    def tell(line: str) -> None:
        try:
            watchdog.stdin.write(f"{line}\n".encode())
            watchdog.stdin.flush()
        except (BrokenPipeError, ValueError):  # the watchdog is gone: nothing to tell
            pass

    class WatchedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            process = super()._run_uvicorn_command()
            tell(str(process.pid))  # at once: a kill during the server's start-up (migrations) must not orphan it
            return process

    # SubprocessASGIServer keeps one instance per port (None: the ephemeral one) in a dict this subclass shares, so
    # every later SubprocessASGIServer() in Prefect's clients returns this instance and starts the server through it.
    if not isinstance(WatchedServer(), WatchedServer):
        tell("done")  # a server was already registered (started before this call): it is not ours to watch
        return
    # A normal exit: Prefect's atexit hook stops the server; the watchdog leaves quietly.
    atexit.register(tell, "done")


def _open(pid: int) -> int | None:
    """A pidfd names this very process, so a late signal cannot hit another process that reused the pid (Linux)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _signal(pid: int, handle: int | None, sig: int) -> None:
    try:
        if handle is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(handle, sig)
    except ProcessLookupError:  # already gone
        pass


def _alive(pid: int, handle: int | None) -> bool:
    if handle is not None:  # a pidfd turns readable when its process has exited (a zombie counts as exited)
        return not select.select([handle], [], [], 0)[0]
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop(servers: dict[int, int | None]) -> None:
    for pid, handle in servers.items():
        _signal(pid, handle, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while any(_alive(pid, handle) for pid, handle in servers.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, handle in servers.items():
        if _alive(pid, handle):
            _signal(pid, handle, signal.SIGKILL)


def _watch(parent: int) -> None:
    """Collect server pids from stdin until `done` (a normal exit: do nothing) or the parent's death (stop them)."""
    servers: dict[int, int | None] = {}
    pending, reading = b"", True

    def read(timeout: float) -> bool:
        """Read what stdin has within timeout; True on `done`."""
        nonlocal pending, reading
        if not reading or not select.select([0], [], [], timeout)[0]:
            return False
        chunk = os.read(0, 4096)
        reading = bool(chunk)  # EOF: kiln closed its end or died; the parent's pid still tells which
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in map(bytes.strip, lines):
            if line == b"done":
                return True
            if line.isdigit():
                servers[int(line)] = _open(int(line))
        return False

    while os.getppid() == parent:
        if read(POLL_S):
            return
        if not reading:
            time.sleep(POLL_S)
    if not read(0):  # what kiln wrote just before it died
        _stop(servers)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
