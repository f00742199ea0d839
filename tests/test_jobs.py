"""Job submission against a local head with token authentication on (Ray 2.60's default), as the README says."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def head():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # A real head, as on a cluster (`ray start --block` stops it when killed), on ports of its own: the test
    # session's Ray already holds the default dashboard-agent port, without which jobs cannot be submitted.
    ray_cli = str(Path(sys.executable).parent / "ray")
    process = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=true",
         f"--port={_free_port()}", f"--dashboard-port={port}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180  # a head starting beside other Ray work on 2 cores can take minutes
        while time.time() < deadline:
            try:
                if _status(f"http://127.0.0.1:{port}/api/version", None) in (200, 401, 403):
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the local head's dashboard did not come up")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)  # `ray start --block` can take 20 s to stop gracefully
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_the_job_server_refuses_requests_without_the_token(head):
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    assert _status(f"{head}/api/jobs/", None) == 401
    assert _status(f"{head}/api/jobs/", "not-the-token") == 403
    assert _status(f"{head}/api/jobs/", token) == 200


def test_ray_job_submit_works_with_the_token_as_the_readme_says(head, tmp_path):
    (tmp_path / "hello.py").write_text("import raydae.config; print('raydae job ran')\n")
    ray_cli = str(Path(sys.executable).parent / "ray")
    command = [ray_cli, "job", "submit", "--address", head, "--working-dir", str(tmp_path), "--",
               sys.executable, "hello.py"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(command, env=base, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    deadline = time.time() + 120
    while True:  # a fresh head's dashboard and job agent take a few seconds to come up
        accepted = subprocess.run(command, env={**base, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                                  timeout=120)
        waiting = ("No available agent", "Failed to connect to Ray at address")  # a loaded head still starting
        if not any(text in accepted.stdout + accepted.stderr for text in waiting) or time.time() > deadline:
            break
        time.sleep(3)
    if "No available agent" in accepted.stdout + accepted.stderr:
        # Seen on a 2-core machine with other Ray sessions beside the test: the head's job agent never
        # registered within 2 minutes. The token was accepted (a refused one gives 401/403), but no job ran,
        # so the job path is reported as not shown to work rather than skipped.
        pytest.xfail("the local head's job agent did not register in 120 s: token accepted, job not run; "
                     + (accepted.stdout + accepted.stderr)[-300:])
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert "raydae job ran" in accepted.stdout
