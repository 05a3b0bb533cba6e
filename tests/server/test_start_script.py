"""scripts/start-sam3.sh as an operator uses it: start, status, refusal of a second copy,
restart after a crash, stop."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "start-sam3.sh"


@pytest.fixture
def env(tiny_checkpoint, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return os.environ | {
        "SAM3_MODEL": str(tiny_checkpoint), "SAM3_PRECISION": "fp32", "SAM3_PORT": str(port),
        "SAM3_RUN_DIR": str(tmp_path / "run"), "SAM3_PYTHON": sys.executable, "SAM3_START_TIMEOUT": "180",
    }


def script(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_start_status_refuse_restart_stop(env, tmp_path):
    started = script("start", env)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert f"ready at http://127.0.0.1:{env['SAM3_PORT']}" in started.stdout
        assert "torch" in started.stdout  # the dependency check reports versions
        assert "ready at" in script("status", env).stdout
        second = script("start", env)
        assert second.returncode == 1 and "already running" in second.stderr

        child = int((tmp_path / "run" / "server.pid").read_text())
        os.kill(child, signal.SIGKILL)  # a crash
        deadline = time.time() + 180
        while time.time() < deadline:
            status = script("status", env).stdout
            pid_file = tmp_path / "run" / "server.pid"
            if "ready at" in status and pid_file.exists() and int(pid_file.read_text()) != child:
                break
            time.sleep(1)
        else:
            pytest.fail("the server was not restarted after being killed")
        assert "restart 1 of" in script("logs", env).stdout
        server = int((tmp_path / "run" / "server.pid").read_text())
        # A client that starts an upload and never finishes it must not keep the server alive.
        stalled = socket.create_connection(("127.0.0.1", int(env["SAM3_PORT"])))
        stalled.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n5\r\n--b\r\n\r\n")
    finally:
        stopped = script("stop", env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert script("status", env).returncode == 3
    time.sleep(0.5)
    assert not Path(f"/proc/{server}").exists() or b"sam3studio" not in Path(f"/proc/{server}/cmdline").read_bytes(), "the server outlived stop"
    stalled.close()


def test_missing_python_is_reported(env):
    result = script("start", env | {"SAM3_PYTHON": "/nonexistent/python"})
    assert result.returncode == 1 and "scripts/setup.sh" in result.stderr


def test_a_model_that_cannot_load_fails_fast_with_its_reason(env, tmp_path):
    result = script("start", env | {"SAM3_MODEL": str(tmp_path / "no-such-model")})
    assert result.returncode == 1 and "could not be loaded" in result.stderr and "no such folder" in result.stderr
    assert script("status", env).returncode == 3, "nothing left running"
