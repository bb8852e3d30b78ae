"""The `kiln` command's Prefect set-up: its settings reach Prefect, and a `kill -9` of kiln leaves no Prefect API
server behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER_APP = "prefect.server.api.server:create_app"  # in the ephemeral server's uvicorn command line


def _processes() -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, state, command line)} of every process still readable."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we looked
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        out[int(entry.name)] = (int(ppid), state, cmdline)
    return out


def _alive(pid: int) -> bool:
    info = _processes().get(pid)
    return info is not None and info[1] != "Z"  # a zombie has ended; only its exit status is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_kill_9_of_kiln_run_ends_its_prefect_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # Prefect's ephemeral server, not ours
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    kiln = subprocess.Popen([sys.executable, "-m", "kiln_cli", "run", "--preset", "smoke", "--run-name", "killed",
                             "--set", f"run_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        server = watchdog = None
        while server is None or watchdog is None:  # both are kiln's children until kiln dies
            assert kiln.poll() is None and time.monotonic() < deadline, "kiln never started the server"
            for pid, (ppid, _, cmdline) in _processes().items():
                if ppid == kiln.pid and SERVER_APP in cmdline:
                    server = pid
                if ppid == kiln.pid and "kiln_cli.prefect_server" in cmdline:
                    watchdog = pid
            time.sleep(0.2)
        # Killed while the server may still be starting (database migrations): the hardest moment to clean up.
        kiln.send_signal(signal.SIGKILL)
        kiln.wait()
        deadline = time.monotonic() + 30  # the watchdog looks every 0.5 s, the server gets 5 s before a SIGKILL
        while (_alive(server) or _alive(watchdog)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), _processes().get(server)
        assert not _alive(watchdog), _processes().get(watchdog)
    finally:
        if kiln.poll() is None:
            kiln.kill()
            kiln.wait()


def test_prefect_settings_the_cli_sets_reach_prefect():
    """The CLI's Prefect defaults are in the environment before Prefect is first imported (Prefect reads its settings
    then): no usage heartbeat (offline it logged 'Failed to send telemetry' as an ERROR on every run) and a start-up
    timeout for the ephemeral server long enough for a busy machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    script = ("import kiln_cli.main\nfrom prefect.settings import get_current_settings\ns = get_current_settings()\n"
              "print(s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds)")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "180"]
