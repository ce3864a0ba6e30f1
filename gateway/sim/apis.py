"""The rest of the API real engines serve, on the simulated node, so that the gateway's tests can
go through the official SDKs: :func:`add_routes` puts them on a node's app.

- OpenAI's Responses API, with the responses each node stores (``responses``);
- Anthropic's Messages API (``anthropic_messages``);
- rerank (``/rerank``, ``/v1/rerank``, ``/v2/rerank``: vLLM's, Jina's and Cohere's shape) and
  score (``/score``, ``/v1/score``), the relevance of a text to another a deterministic word
  overlap;
- audio transcriptions and translations (multipart forms), whose text tells the bytes of audio
  received, their digest and the model, so a test sees the file arrived whole;
- vLLM's ``/tokenize`` and ``/detokenize``: a word a token, as usage counts; the node's own
  answer tokens ``tokK`` are the ids K, any other word an id from its hash, read back by the
  node that tokenized it.

Pooling, audio and tokenizer requests take no batch slot; the status faults, ``reset``, ``hang``,
``slow``'s delay and ``die_mid_stream`` (no answer) apply to them as to a chat.

``/sim/stats`` (and the answers of ``/sim/fault`` and ``/sim/reset``) gain ``paths``, the
requests received by path (``/sim/*`` apart), ``last_headers``, by path, the headers a test may
want to see passed on (``authorization``, ``x-api-key``, ``anthropic-version``, ...) of the
last request there, and ``responses_stored``; ``/sim/reset`` zeroes the first two."""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from typing import Any, Final

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from .answers import ApiError, count_words, prompt_words
from .anthropic_messages import MessagesApi
from .flavors import CONTEXT_TOKENS
from .responses import ResponsesApi
from .serving import (
    Node,
    answer_of,
    die,
    json_answer,
    light,
    model_or_first,
    new_id,
    openai_errors,
    read_json,
)

# The headers /sim/stats shows of the last request on each path, when it had them.
SHOWN_HEADERS: Final = (
    "authorization",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-request-id",
    "content-type",
)
_STATS_PATHS: Final = frozenset({"/sim/stats", "/sim/fault", "/sim/reset"})
_AUDIO_FORMATS: Final = ("json", "text", "verbose_json")
_WORD_IDS: Final = 1 << 20  # the ids below are the node's answer tokens tokK; others hash above
_TOKEN_WORD: Final = re.compile(r"tok(0|[1-9][0-9]*)")
_PUNCTUATION: Final = ".,;:!?\"'()[]{}"


def add_routes(app: web.Application, node: Node) -> web.Application:
    """Serve the further APIs on ``app``, ``node``'s, and count its requests; returns ``app``."""
    Apis(node).install(app)
    return app


class Apis:
    """One node's further APIs, and its counts of requests by path."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.paths: Counter[str] = Counter()
        self.last_headers: dict[str, dict[str, str]] = {}
        self.responses = ResponsesApi(node)
        self.messages = MessagesApi(node)
        self.vocabulary: dict[int, str] = {}  # hashed token id -> the word it was made of
        self._errors = openai_errors(node)

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.counting)  # outermost: counts what any other refuses
        self.responses.add_routes(app)
        self.messages.add_routes(app)
        router = app.router
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            router.add_post(path, self.rerank)
        for path in ("/score", "/v1/score"):
            router.add_post(path, self.score)
        router.add_post("/v1/audio/transcriptions", self.transcriptions)
        router.add_post("/v1/audio/translations", self.translations)
        router.add_post("/tokenize", self.tokenize)
        router.add_post("/detokenize", self.detokenize)

    # --- counting, and /sim/stats ---------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "paths": dict(self.paths),
            "last_headers": self.last_headers,
            "responses_stored": len(self.responses.store),
        }

    @web.middleware
    async def counting(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not path.startswith("/sim/"):
            self.paths[path] += 1
            headers = request.headers
            self.last_headers[path] = {h: headers[h] for h in SHOWN_HEADERS if h in headers}
        response = await handler(request)
        if path in _STATS_PATHS and isinstance(response, web.Response) and response.status == 200:
            if path == "/sim/reset":
                self.paths.clear()
                self.last_headers.clear()
            body = orjson.loads(response.body) if isinstance(response.body, bytes) else None
            if isinstance(body, dict):
                response.body = orjson.dumps({**body, **self.stats()})
        return response

    # --- rerank and score ----------------------------------------------------------------
    async def _pooling(self, request: web.Request) -> tuple[dict[str, Any], str]:
        self.node._check_auth(request)
        body = await read_json(request, self._errors)
        return body, model_or_first(self.node, body)

    def _invalid(self, message: str, param: str) -> ApiError:
        return ApiError(self.node.flavor.error(400, message, "invalid_request_error", param))

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        """The documents by their relevance to the query, most relevant first."""

        async def work() -> web.StreamResponse:
            body, model = await self._pooling(request)
            query, documents = body.get("query"), body.get("documents")
            if not isinstance(query, str):
                raise self._invalid("query must be a string", "query")
            texts = [_document_text(d) for d in documents] if isinstance(documents, list) else []
            if not isinstance(documents, list) or not all(isinstance(t, str) for t in texts):
                raise self._invalid("documents must be a list of strings or of {text}", "documents")
            top_n = body.get("top_n")
            if top_n is not None and (not isinstance(top_n, int) or top_n < 0):
                raise self._invalid("top_n must be a non-negative integer", "top_n")
            fault = await light(self.node, request, self._errors)
            scores = [relevance(query, str(t)) for t in texts]
            order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[: top_n or None]
            with_documents = body.get("return_documents", True) is not False
            results = [
                {
                    "index": i,
                    **({"document": {"text": texts[i]}} if with_documents else {}),
                    "relevance_score": scores[i],
                }
                for i in order
            ]
            tokens = sum(count_words(query) + count_words(t) for t in texts)
            die(request, fault)
            return json_answer(
                {
                    "id": new_id("rerank-"),
                    "model": model,
                    "usage": {"total_tokens": tokens},
                    "results": results,
                }
            )

        return await answer_of(self._errors, work)

    async def score(self, request: web.Request) -> web.StreamResponse:
        """vLLM's score: ``text_1`` against each ``text_2`` (one to one, one to many, or pairs
        of two lists of a length)."""

        async def work() -> web.StreamResponse:
            body, model = await self._pooling(request)
            first, second = body.get("text_1"), body.get("text_2")
            lefts = [first] if isinstance(first, str) else first
            rights = [second] if isinstance(second, str) else second
            if not (_strings(lefts) and _strings(rights)) or not lefts or not rights:
                raise self._invalid("text_1 and text_2 must be strings or lists of them", "text_1")
            if len(lefts) == 1:
                lefts = lefts * len(rights)
            if len(lefts) != len(rights):
                msg = "text_1 and text_2 must be of one length when both are lists"
                raise self._invalid(msg, "text_2")
            fault = await light(self.node, request, self._errors)
            data = [
                {"index": i, "object": "score", "score": relevance(a, b)}
                for i, (a, b) in enumerate(zip(lefts, rights, strict=True))
            ]
            tokens = count_words(lefts) + count_words(rights)
            die(request, fault)
            return json_answer(
                {
                    "id": new_id("score-"),
                    "object": "list",
                    "created": int(time.time()),
                    "model": model,
                    "data": data,
                    "usage": {
                        "prompt_tokens": tokens,
                        "total_tokens": tokens,
                        "completion_tokens": 0,
                    },
                }
            )

        return await answer_of(self._errors, work)

    # --- audio -----------------------------------------------------------------------------
    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await answer_of(self._errors, lambda: self._audio(request, "transcription"))

    async def translations(self, request: web.Request) -> web.StreamResponse:
        return await answer_of(self._errors, lambda: self._audio(request, "translation"))

    async def _audio(self, request: web.Request, task: str) -> web.StreamResponse:
        """A multipart form's ``file`` heard: a text of its size and digest, and the model."""
        self.node._check_auth(request)
        if request.content_type != "multipart/form-data":
            raise self._invalid("the request must be a multipart/form-data form", "file")
        fields: dict[str, str] = {}
        audio: bytes | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue  # a nested multipart: no field of ours
                if part.name == "file":
                    audio = bytes(await part.read())
                elif part.name:
                    fields[part.name] = await part.text()
        except (ValueError, AssertionError) as exc:
            raise self._invalid(f"the multipart form could not be read: {exc}", "file") from None
        if audio is None:
            raise self._invalid("file is required: the audio to hear", "file")
        model = model_or_first(self.node, {"model": fields.get("model")})
        response_format = fields.get("response_format", "json")
        if response_format not in _AUDIO_FORMATS:
            msg = f"response_format must be one of {', '.join(_AUDIO_FORMATS)}"
            raise self._invalid(msg, "response_format")
        fault = await light(self.node, request, self._errors)
        digest = hashlib.blake2b(audio, digest_size=8).hexdigest()
        language = fields.get("language") if task == "transcription" else "en"
        text = f"sim {task} of {len(audio)} bytes of audio blake2b {digest} by {model}"
        if language:
            text += f" in {language}"
        seconds = round(len(audio) / 32_000, 3)  # as 16 kHz 16-bit mono
        die(request, fault)
        if response_format == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        if response_format == "verbose_json":
            verb = "transcribe" if task == "transcription" else "translate"
            return json_answer(
                {
                    "task": verb,
                    "language": language or "english",
                    "duration": seconds,
                    "text": text,
                    "segments": [],
                }
            )
        return json_answer({"text": text, "usage": {"type": "duration", "seconds": seconds}})

    # --- tokenizer --------------------------------------------------------------------------
    def token_id(self, word: str) -> int:
        if _TOKEN_WORD.fullmatch(word) and (k := int(word[3:])) < _WORD_IDS:
            return k
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        token = _WORD_IDS + int.from_bytes(digest, "big")
        self.vocabulary[token] = word
        return token

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        """vLLM's ``/tokenize`` of a ``prompt`` or of chat ``messages``."""

        async def work() -> web.StreamResponse:
            body, _ = await self._pooling(request)
            prompt = body["messages"] if "messages" in body else body.get("prompt")
            if not isinstance(prompt, str | list):
                raise self._invalid("prompt (a string) or messages is required", "prompt")
            fault = await light(self.node, request, self._errors)
            words = prompt_words(prompt)
            strs = words if body.get("return_token_strs") is True else None
            die(request, fault)
            return json_answer(
                {
                    "count": len(words),
                    "max_model_len": CONTEXT_TOKENS,
                    "tokens": [self.token_id(w) for w in words],
                    "token_strs": strs,
                }
            )

        return await answer_of(self._errors, work)

    async def detokenize(self, request: web.Request) -> web.StreamResponse:
        """vLLM's ``/detokenize``: the words of ``tokens``, a space between."""

        async def work() -> web.StreamResponse:
            body, _ = await self._pooling(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
            ):
                raise self._invalid("tokens must be a list of token ids", "tokens")
            words = []
            for token in tokens:
                word = f"tok{token}" if token < _WORD_IDS else self.vocabulary.get(token)
                if word is None:
                    raise self._invalid(f"Token id {token} is out of vocabulary", "tokens")
                words.append(word)
            fault = await light(self.node, request, self._errors)
            die(request, fault)
            return json_answer({"prompt": " ".join(words)})

        return await answer_of(self._errors, work)


def _document_text(document: object) -> object:
    return document.get("text") if isinstance(document, dict) else document


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _words(text: str) -> set[str]:
    return {w.strip(_PUNCTUATION) for w in text.lower().split()} - {""}


def relevance(query: str, document: str) -> float:
    """The words the two share over the words either has (0 to 1, 6 decimals)."""
    a, b = _words(query), _words(document)
    return round(len(a & b) / len(a | b), 6) if a | b else 0.0
