"""``GET /openapi.json``: every endpoint fleetgate serves, as an OpenAPI 3.0 document; and
``GET /docs``: Swagger UI rendering it, from the copy the ``swagger-ui-bundle`` package ships
(no CDN: the page and its assets come from this replica).

The document is made of three parts: the answers and admin bodies fleetgate writes itself, the
JSON schemas of their msgspec types (:mod:`.api_types`); the proxied paths
(:data:`.endpoints.JSON_PATHS` and the Responses API by id) as pass-through, with the fields
fleetgate reads (:class:`.proxy.RequestView`); and every other route of the Starlette app, so a
route added there is listed even before it is described here. Swagger UI 4 reads OpenAPI 3.0,
so msgspec's JSON Schema (2020-12) is rewritten in 3.0's dialect (``nullable``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from typing import Any

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import api_types as t
from .endpoints import JSON_PATHS, Body, Dialect, Endpoint, endpoint_of
from .errors import NotFound
from .proxy import RequestView

SCHEMA_REF = "#/components/schemas/{name}"
DOCS_ASSETS = {
    "swagger-ui.css": "text/css",
    "index.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
"""The files of Swagger UI's distribution the /docs page loads, served under /docs/."""

# A Responses API call by id: its path template and the concrete path endpoints.py matches.
BY_ID_PATHS = {
    "/v1/responses/{response_id}": "/v1/responses/resp_1",
    "/v1/responses/{response_id}/cancel": "/v1/responses/resp_1/cancel",
    "/v1/responses/{response_id}/input_items": "/v1/responses/resp_1/input_items",
}


@dataclass(frozen=True)
class Operation:
    """One method of one of fleetgate's own paths."""

    summary: str
    tag: str
    answers: dict[int, tuple[type | str, str]]  # status -> (type or media type, description)
    body: type | None = None
    admin: bool = False
    client: bool = False
    query: dict[str, str] = field(default_factory=dict)  # query parameter -> description


ADMIN = "Node API"
OPS = "Operations"
_BAD = (t.Error, "a malformed or invalid body")
_DENIED = (t.Error, "no or a wrong admin key, or not from loopback without one")
_GONE = (t.Error, "no such node")
_STORE = (t.Error, "the store is unreachable or refuses writes")
_TARGET = {"node_url": "the node's URL, instead of the body's url"}

OPERATIONS: dict[str, dict[str, Operation]] = {
    "/v1/models": {
        "get": Operation(
            "The models of the active nodes, de-duplicated",
            "OpenAI API",
            {200: (t.ModelList, "the models"), 401: (t.Error, "no or a wrong client key")},
            client=True,
        )
    },
    "/health": {"get": Operation("Liveness: the process answers", OPS, {200: (t.Health, "alive")})},
    "/ready": {
        "get": Operation(
            "Readiness: the store answers and takes leases, and an active node exists",
            OPS,
            {200: (t.Ready, "ready"), 503: (t.Ready, "not ready: see reasons")},
        )
    },
    "/metrics": {
        "get": Operation(
            "Prometheus metrics of this replica (summed over its workers)",
            OPS,
            {200: ("text/plain", "Prometheus text format 0.0.4")},
        )
    },
    "/nodes/status": {
        "get": Operation(
            "Every node: LMDeploy's fields, state, load, ejection, queue by model",
            ADMIN,
            {
                200: (dict[str, t.NodeStatusEntry], "each node by URL"),
                403: _DENIED,
            },
            admin=True,
        )
    },
    "/nodes/replicas": {
        "get": Operation(
            "Gateway replicas renewing their leases",
            ADMIN,
            {200: (t.Replicas, "the live replicas"), 403: _DENIED},
            admin=True,
        )
    },
    "/nodes/add": {
        "post": Operation(
            "Register a node, or update a known one (LMDeploy's self-registration)",
            ADMIN,
            {
                200: (t.NodeAdded, "registered"),
                400: _BAD,
                403: (t.Error, "not an admin, and not a node registering itself"),
                502: (t.Error, "no models given and the node's /v1/models unreadable"),
                503: _STORE,
            },
            body=t.NodeAdd,
            admin=True,
            query=_TARGET,
        )
    },
    "/nodes/remove": {
        "post": Operation(
            "Remove a node (its DistServe pairs and sessions too)",
            ADMIN,
            {200: (t.NodeRemoved, "removed"), 400: _BAD, 403: _DENIED, 404: _GONE, 503: _STORE},
            body=t.NodeTarget,
            admin=True,
            query=_TARGET,
        )
    },
    "/nodes/drain": {
        "post": Operation(
            "Drain a node: no new requests, those in flight finish",
            ADMIN,
            {200: (t.NodeDraining, "draining"), 400: _BAD, 403: _DENIED, 404: _GONE},
            body=t.NodeTarget,
            admin=True,
            query=_TARGET,
        )
    },
    "/nodes/terminate": {
        "post": Operation(
            "Remove a node and ask it to stop (its /terminate)",
            ADMIN,
            {
                200: (t.NodeTerminated, "removed and stopped"),
                404: _GONE,
                403: _DENIED,
                502: (t.NodeTerminated, "removed, but it could not be stopped"),
            },
            body=t.NodeTarget,
            admin=True,
            query=_TARGET,
        )
    },
    "/nodes/terminate_all": {
        "get": Operation(
            "Remove every node and ask each to stop",
            ADMIN,
            {
                200: (t.AllTerminated, "all stopped"),
                403: _DENIED,
                502: (t.AllTerminated, "some did not stop"),
            },
            admin=True,
        )
    },
    "/distserve/connection_warmup": {
        "post": Operation(
            "DistServe: connect every (Prefill, Decode) pair now",
            "DistServe",
            {
                200: (t.Warmup, "every pair connected"),
                400: (t.Error, "this gateway serves Hybrid"),
                403: _DENIED,
                502: (t.Warmup, "some pairs could not be connected"),
            },
            admin=True,
        )
    },
    "/distserve/gc": {
        "post": Operation(
            "DistServe: free prefill sessions whose migration is over or orphaned",
            "DistServe",
            {
                200: (t.Collected, "collected"),
                400: (t.Error, "this gateway serves Hybrid"),
                403: _DENIED,
            },
            admin=True,
        )
    },
    "/openapi.json": {
        "get": Operation("This document", OPS, {200: ("application/json", "OpenAPI 3.0")})
    },
    "/docs": {"get": Operation("Swagger UI over this document", OPS, {200: ("text/html", "")})},
    "/docs/{asset}": {
        "get": Operation(
            "Swagger UI's files, served from the swagger-ui-bundle package",
            OPS,
            {200: ("application/octet-stream", "the file"), 404: (t.Error, "no such file")},
        )
    },
}

_SUMMARIES = {
    "/v1/chat/completions": "OpenAI chat completions",
    "/v1/completions": "OpenAI completions",
    "/v1/embeddings": "OpenAI embeddings",
    "/v1/responses": "OpenAI Responses API (the answer's id recorded with its node)",
    "/v1/messages": "Anthropic Messages API",
    "/v1/messages/count_tokens": "Anthropic token counting",
    "/v1/rerank": "Rerank documents against a query (vLLM's, Jina's, Cohere's shapes)",
    "/rerank": "Rerank documents against a query (vLLM's, Jina's, Cohere's shapes)",
    "/v2/rerank": "Rerank documents against a query (Cohere's v2 shape)",
    "/v1/score": "Score text pairs (vLLM)",
    "/score": "Score text pairs (vLLM)",
    "/tokenize": "Tokenize a prompt (vLLM)",
    "/detokenize": "Detokenize token ids (vLLM)",
    "/v1/audio/transcriptions": "OpenAI audio transcription (multipart)",
    "/v1/audio/translations": "OpenAI audio translation (multipart)",
}
_BY_ID_SUMMARIES = {
    ("/v1/responses/{response_id}", "get"): "A stored response, from the node that holds it",
    ("/v1/responses/{response_id}", "delete"): "Delete a stored response (its id forgotten)",
    ("/v1/responses/{response_id}/cancel", "post"): "Cancel a background response",
    ("/v1/responses/{response_id}/input_items", "get"): "A stored response's input items",
}


def _operation_id(method: str, path: str) -> str:
    """``get_v1_responses_response_id``: unique per operation, as code generators need."""
    return method + "_" + re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")


def _tag(path: str, endpoint: Endpoint) -> str:
    if endpoint.dialect is Dialect.ANTHROPIC:
        return "Anthropic API (proxied)"
    if endpoint.dialect is Dialect.RESPONSES:
        return "Responses API (proxied)"
    return "OpenAI API (proxied)"


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


_ROUTED_HEADERS = {
    "x-fleetgate-node": "the node that answered",
    "x-fleetgate-route": "why: strategy, candidates, score, epoch, attempts, state",
    "x-request-id": "the request's id (the client's, or made here)",
}


def _proxied(schemas: _Schemas, path: str, method: str, endpoint: Endpoint) -> dict[str, Any]:
    """A proxied operation: the body passes through as it is; fleetgate reads only a few
    fields to route it, and writes only its errors."""
    error = t.AnthropicError if endpoint.dialect is Dialect.ANTHROPIC else t.Error
    error_ref = schemas.ref(error)
    headers = {
        name: {"description": d, "schema": {"type": "string"}}
        for name, d in _ROUTED_HEADERS.items()
    }
    passed = {
        "type": "object",
        "additionalProperties": True,
        "description": "the node's answer, as it sent it",
    }
    ok: dict[str, Any] = {"application/json": {"schema": passed}}
    operation: dict[str, Any] = {
        "tags": [_tag(path, endpoint)],
        "summary": _SUMMARIES.get(path, f"{path}, routed by model"),
        "operationId": _operation_id(method, path),
        "parameters": [
            _header("x-session-id", "session_affinity's session key (else the body's user)"),
            _header(
                "x-fleetgate-priority",
                "high, normal or low: the request's place in the fleet's queue",
            ),
        ],
        "responses": {
            "200": {"description": "relayed from the node", "headers": headers, "content": ok},
            "4XX": {
                "description": "refused by fleetgate (or the node's own answer)",
                "content": {"application/json": {"schema": error_ref}},
            },
            "5XX": {
                "description": "no node could answer (or the node's own answer)",
                "content": {"application/json": {"schema": error_ref}},
            },
        },
        "security": [{"clientKey": []}, {}],
    }
    if endpoint.dialect is Dialect.ANTHROPIC:
        operation["security"] = [{"anthropicKey": []}, {"clientKey": []}, {}]
        operation["parameters"].append(_header("anthropic-version", "passed on to the node"))
    if endpoint.body is Body.JSON:
        ok["text/event-stream"] = {
            "schema": {"type": "string", "description": "with stream: true, relayed event by event"}
        }
        read = schemas.ref(RequestView)
        operation["requestBody"] = {
            "required": True,
            "description": "passed on byte for byte; fleetgate reads only model, stream, user and "
            "previous_response_id (and, with cache_aware, the prompt: messages or prompt)",
            "content": {
                "application/json": {
                    "schema": {"allOf": [read], "required": ["model"], "additionalProperties": True}
                }
            },
        }
    elif endpoint.body is Body.MULTIPART:
        form = {
            "type": "object",
            "required": ["model", "file"],
            "properties": {
                "model": {"type": "string"},
                "file": {"type": "string", "format": "binary"},
            },
            "additionalProperties": True,
        }
        operation["requestBody"] = {
            "required": True,
            "description": "passed on as it is; fleetgate reads the model field in place",
            "content": {"multipart/form-data": {"schema": form}},
        }
    else:
        operation["summary"] = _BY_ID_SUMMARIES[(path, method)]
        operation["parameters"].insert(
            0,
            {
                "name": "response_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "sent to the node that made this response; 404 "
                "response_not_found when none is known",
            },
        )
    return operation


def _own(schemas: _Schemas, path: str, method: str, op: Operation) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": _operation_id(method, path),
        "responses": {},
    }
    for status, (kind, description) in op.answers.items():
        if isinstance(kind, str):
            content = {kind: {"schema": {"type": "string"}}}
        else:
            content = {"application/json": {"schema": schemas.ref(kind)}}
        operation["responses"][str(status)] = {
            "description": description or "the page",
            "content": content,
        }
    if op.body is not None:
        operation["requestBody"] = {
            "required": not op.query,
            "content": {"application/json": {"schema": schemas.ref(op.body)}},
        }
    params = [
        {
            "name": n,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": d,
        }
        for n, d in op.query.items()
    ]
    if "{asset}" in path:
        params.append(
            {
                "name": "asset",
                "in": "path",
                "required": True,
                "schema": {
                    "type": "string",
                    "enum": [*sorted(DOCS_ASSETS), "swagger-initializer.js"],
                },
            }
        )
    if params:
        operation["parameters"] = params
    if op.admin:
        operation["security"] = [{"adminKey": []}, {}]
    elif op.client:
        operation["security"] = [{"clientKey": []}, {}]
    return operation


# -- schemas: msgspec's JSON Schema in OpenAPI 3.0's dialect ------------------------------------


class _Schemas:
    """The types a document refers to, for its components."""

    def __init__(self) -> None:
        self.types: dict[str, Any] = {}

    def ref(self, kind: Any) -> dict[str, Any]:
        """A schema for ``kind``: a reference to its component, or an inline container."""
        schema: dict[str, Any] = msgspec.json.schema(kind, ref_template=SCHEMA_REF)
        schema.pop("$defs", None)
        self.types[repr(kind)] = kind
        return schema

    def components(self) -> dict[str, Any]:
        _, found = msgspec.json.schema_components(self.types.values(), ref_template=SCHEMA_REF)
        return dict(sorted(found.items()))


def _openapi30(node: Any) -> Any:
    """msgspec's JSON Schema 2020-12 as OpenAPI 3.0 reads it: ``null`` in ``anyOf`` becomes
    ``nullable``, ``const`` an enum of one, an empty ``required`` goes."""
    if isinstance(node, list):
        return [_openapi30(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi30(v) for k, v in node.items()}
    choices = out.get("anyOf")
    if isinstance(choices, list) and {"type": "null"} in choices:
        rest = [c for c in choices if c != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**rest[0], **out}
        else:
            out["anyOf" if len(rest) > 1 else "allOf"] = rest
        out["nullable"] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if out.get("required") == []:
        del out["required"]
    return out


def document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes`` (the Starlette app's) and the proxied paths."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for path, endpoint in JSON_PATHS.items():
        paths[path] = {
            m.lower(): _proxied(schemas, path, m.lower(), endpoint)
            for m in sorted(endpoint.methods)
        }
    for template, example in BY_ID_PATHS.items():
        methods = {"GET", "POST", "DELETE"}
        found = {m: endpoint_of(example, m) for m in methods}
        paths[template] = {
            m.lower(): _proxied(schemas, template, m.lower(), hit[0])
            for m, hit in sorted(found.items())
            if hit is not None and m in hit[0].methods
        }
    for route in routes:
        if not isinstance(route, Route):
            continue
        described = OPERATIONS.get(route.path, {})
        for method in sorted((route.methods or set()) - {"HEAD"}):
            lower = method.lower()
            op = described.get(lower) or Operation(
                route.name.replace("_", " "), OPS, {200: ("application/json", "")}
            )
            paths.setdefault(route.path, {})[lower] = _own(schemas, route.path, lower, op)
    info = {
        "title": "fleetgate",
        "version": _version(),
        "description": "A load-balancing gateway for OpenAI-compatible LLM inference servers. "
        "Proxied paths pass the body through to a node chosen by its model; fleetgate's own "
        "endpoints (health, readiness, metrics, the node API) are described in full.",
    }
    security = {
        "clientKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "a client key (--api-key or fleetgate keys); none configured: open",
        },
        "anthropicKey": {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "a client key as Anthropic clients send it",
        },
        "adminKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "--admin-key; none configured: loopback only",
        },
    }
    result: dict[str, Any] = _openapi30(
        {
            "openapi": "3.0.3",
            "info": info,
            "paths": dict(sorted(paths.items())),
            "components": {"schemas": schemas.components(), "securitySchemes": security},
        }
    )
    return result


def _version() -> str:
    try:
        return importlib.metadata.version("fleetgate")
    except importlib.metadata.PackageNotFoundError:
        return "0"


# -- the endpoints ---------------------------------------------------------------------------

_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>fleetgate API</title>
<link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
<link rel="stylesheet" type="text/css" href="/docs/index.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="/docs/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
<script src="/docs/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
<script src="/docs/swagger-initializer.js" charset="UTF-8"></script>
</body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to an online validator.
_INITIALIZER = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
"""


class ApiDocs:
    """The /openapi.json, /docs and /docs/{asset} endpoints; the document is made once."""

    def __init__(self) -> None:
        self._document: bytes | None = None
        self._assets: dict[str, bytes] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/openapi.json", self.openapi_json, methods=["GET"]),
            Route("/docs", self.page, methods=["GET"]),
            Route("/docs/{asset}", self.asset, methods=["GET"]),
        ]

    async def openapi_json(self, request: Request) -> Response:
        if self._document is None:
            self._document = orjson.dumps(document(request.app.routes))
        return Response(self._document, media_type="application/json")

    async def page(self, request: Request) -> Response:
        return Response(_PAGE, media_type="text/html")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["asset"]
        if name == "swagger-initializer.js":
            return Response(_INITIALIZER, media_type="text/javascript")
        if name not in DOCS_ASSETS:
            raise NotFound(f"no route {request.url.path}")
        if name not in self._assets:
            self._assets[name] = (_swagger_ui() / name).read_bytes()
        headers = {"cache-control": "public, max-age=86400"}
        return Response(self._assets[name], media_type=DOCS_ASSETS[name], headers=headers)


def _swagger_ui() -> Traversable:
    """Swagger UI's distribution folder in the swagger-ui-bundle package."""
    vendor = importlib.resources.files("swagger_ui_bundle") / "vendor"
    return next(p for p in vendor.iterdir() if p.name.startswith("swagger-ui-"))
