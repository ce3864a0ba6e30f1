"""``fleetgate demo`` as a newcomer runs it: start, paste the printed curl, Ctrl-C."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time

import httpx

from tests.support.clients import sdk
from tests.support.harness import free_port, wait_for_port
from tests.support.processes import Process


def test_demo_serves_the_printed_examples_and_stops_on_ctrl_c() -> None:
    port = free_port()
    demo = Process([sys.executable, "-m", "gateway.cli", "demo", "--port", str(port)], "demo")
    try:
        wait_for_port(port, timeout_s=20)
        deadline = time.monotonic() + 10
        while "Ctrl-C" not in demo.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = demo.output()
        curl = next(line.strip() for line in out.splitlines() if "/v1/chat/completions" in line)
        argv = shlex.split(curl)
        url = argv[1]
        body = argv[argv.index("-d") + 1]
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        model = response.json()["model"]
        with sdk(f"http://127.0.0.1:{port}") as client:  # its socket closed before the demo
            chat = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}]
            )
        assert chat.choices[0].message.content
        status = httpx.get(f"http://127.0.0.1:{port}/nodes/status").json()
        assert len(status) == 3 and all(entry["state"] == "active" for entry in status.values())
        assert re.search(r"simulated node http://127\.0\.0\.1:\d+", out)
        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(timeout=15) == 0
    finally:
        demo.close()


def test_demo_refuses_a_busy_port_in_one_line() -> None:
    port = free_port()
    first = Process([sys.executable, "-m", "gateway.cli", "demo", "--port", str(port)], "demo1")
    try:
        wait_for_port(port, timeout_s=20)
        second = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "in use" in second.stderr.strip().splitlines()[-1]
    finally:
        first.close()
