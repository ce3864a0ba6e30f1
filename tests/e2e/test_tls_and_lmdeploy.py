"""LMDeploy's proxy command line, HTTPS on both sides, and /nodes/terminate."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.checker.probes import Prober
from shared_state import Node
from tests.support import MODEL
from tests.support.harness import free_port, wait_for_port
from tests.support.processes import Gateway, Process, SimNode


class HttpsNode(Process):
    def __init__(self, cert: Path, key: Path) -> None:
        self.port = free_port()
        super().__init__(
            [
                sys.executable,
                "-m",
                "gateway.sim.node",
                "--port",
                str(self.port),
                "--tokens-per-s",
                "inf",
                "--certfile",
                str(cert),
                "--keyfile",
                str(key),
            ],
            f"https-node-{self.port}",
        )
        wait_for_port(self.port)
        self.url = f"https://127.0.0.1:{self.port}"


def test_lmdeploy_command_line_serves_https_end_to_end(
    certificate: tuple[Path, Path], procs: list[Process]
) -> None:
    cert, key = certificate
    node = HttpsNode(cert, key)
    procs.append(node)
    port = free_port()
    # The command line of `lmdeploy serve proxy`, with `fleetgate serve` in front of it.
    gateway = Process(
        [
            sys.executable,
            "-m",
            "gateway",
            "--server-name",
            "127.0.0.1",
            "--server-port",
            str(port),
            "--routing-strategy",
            "min_observed_latency",
            "--serving-strategy",
            "Hybrid",
            "--api-keys",
            "key-one-0123456789",
            "key-two-0123456789",
            "--log-level",
            "INFO",
            "--disable-cache-status",
            "--ssl",
            "--upstream-ca-bundle",
            str(cert),
        ],
        "lmdeploy-style",
        env={"SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(key)},
    )
    procs.append(gateway)
    wait_for_port(port, timeout_s=20)
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(verify=trust, timeout=10) as http:
        added = http.post(f"{base}/nodes/add", json={"url": node.url})  # models asked over TLS
        assert added.status_code == 200, added.text
        wrong = http.post(
            f"{base}/v1/chat/completions",
            json={"model": MODEL},
            headers={"authorization": "Bearer key-three-0123456789"},
        )
        assert wrong.status_code == 401
        with openai.OpenAI(  # closes the http client when done
            base_url=f"{base}/v1",
            api_key="key-two-0123456789",
            max_retries=0,
            # openai takes an httpx.Client at run time; its annotation names httpx2's only.
            http_client=http,  # type: ignore[arg-type]
        ) as sdk:
            raw = sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert raw.parse().choices[0].message.content == "tok0 tok1 "
            assert raw.headers["x-fleetgate-node"] == node.url
            assert "strategy=min_observed_latency" in raw.headers["x-fleetgate-route"]
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert "--disable-cache-status has no effect" in gateway.output()


def test_unknown_serving_strategy_and_ssl_without_files_stop_start_up_in_one_line(
    certificate: tuple[Path, Path],
) -> None:
    for args in (["--serving-strategy", "Bogus"], ["--migration-protocol", "TCP"], ["--ssl"]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr


def test_upstream_certificates_are_verified_unless_the_node_is_insecure(
    certificate: tuple[Path, Path], procs: list[Process]
) -> None:
    cert, key = certificate
    node = HttpsNode(cert, key)
    procs.append(node)
    gateway = Gateway()  # no CA bundle: the self-signed node cannot be trusted
    procs.append(gateway)
    body = {"model": MODEL, "messages": [], "max_tokens": 1}
    with httpx.Client(timeout=10) as http:
        add = {"url": node.url, "status": {"models": [MODEL]}}
        assert http.post(f"{gateway.url}/nodes/add", json=add).status_code == 200
        refused = http.post(f"{gateway.url}/v1/chat/completions", json=body)
        assert refused.status_code == 502 and "TLS" in refused.json()["error"]["message"]
        insecure = {**add, "insecure": True}
        assert http.post(f"{gateway.url}/nodes/add", json=insecure).status_code == 200
        ok = http.post(f"{gateway.url}/v1/chat/completions", json=body)
        assert ok.status_code == 200 and ok.headers["x-fleetgate-node"] == node.url
        status = http.get(f"{gateway.url}/nodes/status").json()
        assert status[node.url]["insecure"] is True


def test_terminate_removes_and_stops_nodes_and_says_when_it_cannot(
    procs: list[Process],
) -> None:
    a, b = SimNode("--tokens-per-s", "inf"), SimNode("--tokens-per-s", "inf")
    procs += [a, b]
    gateway = Gateway("--node", a.url, "--node", b.url)
    procs.append(gateway)
    gateway.wait_models(MODEL)
    with httpx.Client(timeout=10) as http:
        done = http.post(f"{gateway.url}/nodes/terminate", json={"url": a.url})
        assert done.status_code == 200, done.text
        assert done.json()["message"] == "Terminated successfully"
        assert a.proc.wait(timeout=10) == 0  # the node stopped itself
        assert list(http.get(f"{gateway.url}/nodes/status").json()) == [b.url]
        # A node that cannot be reached is removed, and the answer says it did not stop.
        ghost = f"http://127.0.0.1:{free_port()}"
        add = {"url": ghost, "status": {"models": [MODEL]}}
        assert http.post(f"{gateway.url}/nodes/add", json=add).status_code == 200
        failed = http.post(f"{gateway.url}/nodes/terminate", json={"url": ghost})
        assert failed.status_code == 502
        assert failed.json()["removed"] is True and failed.json()["terminated"] is False
        assert failed.json()["error"]["code"] == "terminate_failed"
        unknown = http.post(f"{gateway.url}/nodes/terminate", json={"url": ghost})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "node_not_found"
        bad = http.post(f"{gateway.url}/nodes/terminate", json={"url": "ftp://x"})
        assert bad.status_code == 400
        everything = http.get(f"{gateway.url}/nodes/terminate_all")
        assert everything.status_code == 200, everything.text
        assert everything.json()["nodes"][b.url]["terminated"] is True
        assert b.proc.wait(timeout=10) == 0
        assert http.get(f"{gateway.url}/nodes/status").json() == {}


async def test_checker_probes_an_insecure_node_without_certificate_checks(
    certificate: tuple[Path, Path], procs: list[Process]
) -> None:
    """A node registered as insecure is probed as the gateway reaches it; a verified one with
    a self-signed certificate fails its probe."""
    cert, key = certificate
    node = HttpsNode(cert, key)
    procs.append(node)
    prober = Prober(timeout_s=5.0)
    try:
        insecure = Node(id=node.url, url=node.url, models=(MODEL,), insecure=True)
        verified = Node(id=node.url, url=node.url, models=(MODEL,))
        assert (await prober.health(insecure)).ok
        assert (await prober.generate(insecure)).ok
        assert not (await prober.health(verified)).ok
    finally:
        await prober.close()
