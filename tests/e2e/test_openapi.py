"""``GET /openapi.json`` and ``GET /docs`` of a running gateway: the document is OpenAPI 3
(checked for structure: every reference resolves, every templated path declares its parameter,
operation ids are unique), it lists every route of the Starlette app and every proxied path
with its methods, and the answers it describes are what the gateway answers (real answers
decoded with the described types, which forbid unknown fields); /docs is Swagger UI from local
assets only, every one of them served."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from starlette.routing import Route

from gateway.replica import api_types as t
from gateway.replica.app import Gateway as GatewayProcess
from gateway.replica.app import build_starlette
from gateway.replica.endpoints import JSON_PATHS, endpoint_of
from gateway.replica.settings import load_settings
from tests.support import MODEL
from tests.support.processes import Gateway, SimNode

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
BY_ID = ("/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel")


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    node = SimNode("--tokens-per-s", "inf", name="openapi-node")
    gateway = Gateway("--node", node.url, name="openapi")
    try:
        gateway.wait_models(MODEL)
        yield gateway
    finally:
        gateway.close()
        node.close()


@pytest.fixture(scope="module")
def spec(gateway: Gateway) -> dict[str, Any]:
    answer = httpx.get(f"{gateway.url}/openapi.json", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    found: dict[str, Any] = answer.json()
    return found


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        assert part in node, f"unresolved {ref}"
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_openapi_document_is_openapi_3(spec: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.0\.\d+", spec["openapi"])
    assert spec["info"]["title"] == "fleetgate" and spec["info"]["version"]
    for ref in set(refs(spec)):
        resolve(spec, ref)
    ids = []
    for path, item in spec["paths"].items():
        assert path.startswith("/"), path
        assert set(item) <= METHODS, path
        for method, operation in item.items():
            ids.append(operation["operationId"])
            assert operation["responses"], f"{method} {path}"
            for status, answer in operation["responses"].items():
                assert re.fullmatch(r"[1-5](\d\d|XX)|default", status), status
                assert isinstance(answer["description"], str)
            declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), f"{method} {path}"
            for parameter in operation.get("parameters", ()):
                assert parameter["in"] in {"path", "query", "header", "cookie"}
                assert "schema" in parameter
    assert len(ids) == len(set(ids))
    for name, schema in spec["components"]["schemas"].items():
        assert isinstance(schema, dict), name
        assert "$defs" not in schema and "prefixItems" not in schema, name  # 3.1 only
        assert {"type": "null"} not in schema.get("anyOf", ()), name


def test_openapi_lists_every_route_and_proxied_path(spec: dict[str, Any]) -> None:
    app = build_starlette(GatewayProcess(load_settings([])))
    routes = [r for r in app.routes if isinstance(r, Route)]
    assert {"/health", "/ready", "/metrics", "/v1/models", "/openapi.json", "/docs"} <= {
        r.path for r in routes
    }
    for route in routes:
        described = spec["paths"].get(route.path)
        assert described is not None, f"{route.path} not in /openapi.json"
        assert {m.lower() for m in route.methods or ()} - {"head"} <= set(described), route.path
    for path, endpoint in JSON_PATHS.items():
        assert {m.lower() for m in endpoint.methods} == set(spec["paths"][path]), path
        operation = spec["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert content.keys() == {"multipart/form-data" if "audio" in path else "application/json"}
    for template in spec["paths"]:
        if template.startswith("/v1/responses/"):
            concrete = template.replace("{response_id}", "resp_abc")
            for method in spec["paths"][template]:
                found = endpoint_of(concrete, method.upper())
                assert found is not None and method.upper() in found[0].methods, template
    assert set(BY_ID) <= set(spec["paths"])
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    view = resolve(spec, body["allOf"][0]["$ref"])
    assert {"model", "stream", "user", "previous_response_id"} <= set(view["properties"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    messages = spec["paths"]["/v1/messages"]["post"]["responses"]["4XX"]
    error = messages["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/AnthropicError")


def decoded(answer: httpx.Response, kind: Any, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return msgspec.json.decode(answer.content, type=kind)


def test_described_answers_are_the_real_ones(gateway: Gateway, spec: dict[str, Any]) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        decoded(http.get("/health"), t.Health)
        decoded(http.get("/ready"), t.Ready)
        models = decoded(http.get("/v1/models"), t.ModelList)
        assert [m.id for m in models.data] == [MODEL]
        statuses = decoded(http.get("/nodes/status"), dict[str, t.NodeStatusEntry])
        url = next(iter(statuses))
        decoded(http.get("/nodes/replicas"), t.Replicas)
        added = decoded(http.post("/nodes/add", json={"url": url, "weight": 2}), t.NodeAdded)
        assert added.node.weight == 2
        drained = decoded(http.post("/nodes/drain", json={"url": url}), t.NodeDraining)
        assert drained.node.state.value == "draining"
        decoded(http.post("/nodes/remove", json={"url": url}), t.NodeRemoved)
        decoded(http.post("/nodes/remove", json={"url": url}), t.Error, 404)
        decoded(http.post("/distserve/gc"), t.Error, 400)
        anthropic = http.post("/v1/messages", json={"max_tokens": 1, "messages": []})
        decoded(anthropic, t.AnthropicError, 400)
    described = spec["paths"]["/nodes/status"]["get"]["responses"]["200"]["content"]
    entry = described["application/json"]["schema"]["additionalProperties"]["$ref"]
    assert entry.endswith("/NodeStatusEntry")


def test_docs_is_swagger_ui_from_local_assets(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        page = http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "swagger-ui" in page.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert len(assets) >= 5
        assert "http" not in page.text.lower().replace("http-equiv", "")
        for asset in assets:
            assert asset.startswith("/") and not asset.startswith("//"), asset
            served = http.get(asset)
            assert served.status_code == 200, asset
            assert len(served.content) > 100, asset
            if asset.endswith(".js"):
                assert "javascript" in served.headers["content-type"]
            if asset.endswith(".css"):
                assert served.headers["content-type"].startswith("text/css")
        initializer = http.get("/docs/swagger-initializer.js").text
        assert 'url: "/openapi.json"' in initializer and "validatorUrl: null" in initializer
        assert not re.search(r"https?://", initializer)
        assert http.get("/docs/../pyproject.toml").status_code == 404
        assert http.get("/docs/swagger-ui.js.map").status_code == 404
