"""The chat load generator: the turns of a chat schedule (scripts/bench/chats.py) sent open loop
through gateway replicas, each carrying its conversation's history with the answers it really
got, plain or streamed (SSE, the usage chunk asked for); what became of each; and the figures
of a run.

Invariants:

- A turn is sent at its scheduled time, or later once its conversation's previous turn has
  its answer (a chat client cannot ask the next question before). The wait is recorded
  (``held_s``) and latency counts from the send, so a held turn is not charged for its
  predecessor's time; a failed turn leaves a placeholder answer, so its conversation goes on.
- TTFT is to the first chunk carrying content: llama.cpp and vLLM open a chat stream with a
  role-only chunk that says nothing of the prefill.
- Prompt and cached tokens are the engine's own, from the usage it answered with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from scripts.bench.chats import ChatTurn, ChatWorkload, messages
from scripts.bench.figures import quantile
from scripts.bench.hits import PromptTokens, total, usage_tokens
from scripts.bench.load import CHAT_PATH, REQUEST_TIMEOUT_S, EventSplitter, event_kind

FAILED_ANSWER = "(no answer)"
ERROR_SAMPLES = 4
NUMERIC = (
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "hit_rate",
    "hit_rate_first",
    "hit_rate_later",
    "miss_share",
    "errors",
    "requests",
    "held",
)


@dataclass(slots=True)
class ChatResult:
    """What became of one turn."""

    turn: ChatTurn
    replica: int
    sent: float = math.nan  # s after the start of the run
    held_s: float = 0.0  # s it waited past its time for its predecessor's answer
    ok: bool = False
    error: str = ""
    detail: str = ""
    latency: float = math.nan  # s, sent to last byte
    ttft: float = math.nan  # s, sent to the first content chunk (streams)
    node: str = ""
    tokens: PromptTokens = field(default_factory=PromptTokens)
    completion_tokens: int = 0
    answer: str = FAILED_ANSWER


def request_body(
    model: str, workload: ChatWorkload, seed: int, turn: ChatTurn, answers: Sequence[str]
) -> dict[str, Any]:
    """The chat request of ``turn``: greedy, ``answer_tokens`` long, usage asked for in a
    stream."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages(workload, seed, turn, answers),
        "max_tokens": workload.answer_tokens,
        "temperature": 0,
        "stream": turn.stream,
    }
    if turn.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _read_stream(
    resp: aiohttp.ClientResponse, res: ChatResult, start: float, loop: asyncio.AbstractEventLoop
) -> None:
    splitter = EventSplitter()
    pieces: list[str] = []
    done = False
    async for chunk in resp.content.iter_any():
        for event in splitter.feed(chunk):
            kind = event_kind(event)
            if kind == "done":
                done = True
            elif kind == "error":
                res.error, res.detail = "SSE error event", event[:300].decode("utf-8", "replace")
            elif kind == "data":
                data = json.loads(event[len(b"data:") :])
                for choice in data.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        if not pieces:
                            res.ttft = loop.time() - start
                        pieces.append(text)
                if data.get("usage"):
                    res.tokens = usage_tokens(data["usage"])
                    res.completion_tokens = int(data["usage"].get("completion_tokens") or 0)
    if not res.error and not done:
        res.error, res.detail = "stream without [DONE]", f"{len(pieces)} pieces"
    if not res.error and not res.tokens.prompt:
        res.error, res.detail = "stream without usage", f"{len(pieces)} pieces"
    res.answer = "".join(pieces)


async def send_turn(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any], res: ChatResult
) -> None:
    """Send one turn's ``body`` to ``base``; fills ``res`` (its answer, usage, timings)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    headers = {"X-Session-ID": f"chat-{res.turn.chat}"}
    try:
        async with session.post(base + CHAT_PATH, json=body, headers=headers) as resp:
            res.node = resp.headers.get("x-fleetgate-node", "")
            if resp.status != 200:
                text = await resp.read()
                res.error, res.detail = f"HTTP {resp.status}", text[:300].decode("utf-8", "replace")
            elif res.turn.stream:
                await _read_stream(resp, res, start, loop)
            else:
                data = await resp.json()
                res.answer = data["choices"][0]["message"]["content"] or ""
                res.tokens = usage_tokens(data.get("usage"))
                res.completion_tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    if res.error:
        res.answer = FAILED_ANSWER
    else:
        res.ok = True
        res.latency = loop.time() - start


async def drive_chats(
    session: aiohttp.ClientSession,
    schedule: Sequence[ChatTurn],
    body_of: Callable[[ChatTurn, Sequence[str]], dict[str, Any]],
    bases: Sequence[str],
    t0: float,
) -> list[ChatResult]:
    """Send each turn at ``t0 + at`` (loop clock), or once its predecessor is answered, to the
    replica its ``u`` picks among ``bases``; ``body_of(turn, earlier answers)`` makes its
    request."""
    loop = asyncio.get_running_loop()
    answers: dict[int, list[str]] = {}
    last: dict[int, asyncio.Future[None]] = {}
    results: list[ChatResult] = []

    async def one(
        turn: ChatTurn, before: asyncio.Future[None] | None, mine: asyncio.Future[None]
    ) -> None:
        try:
            due = t0 + turn.at
            await asyncio.sleep(max(0.0, due - loop.time()))
            if before is not None:
                await before
            index = min(int(turn.u * len(bases)), len(bases) - 1)
            res = ChatResult(turn, index)
            res.sent = loop.time() - t0
            res.held_s = max(0.0, loop.time() - due)
            results.append(res)
            history = answers.setdefault(turn.chat, [])
            history += [FAILED_ANSWER] * (turn.turn - len(history))  # a predecessor cancelled
            await send_turn(session, bases[index], body_of(turn, history[: turn.turn]), res)
            history.append(res.answer)
        finally:
            if not mine.done():
                mine.set_result(None)

    tasks = []
    for turn in schedule:
        mine: asyncio.Future[None] = loop.create_future()
        tasks.append(asyncio.ensure_future(one(turn, last.get(turn.chat), mine)))
        last[turn.chat] = mine
    gathered = asyncio.gather(*tasks)
    gathered.add_done_callback(_retrieve)  # when interrupted, nobody else will look at it
    span = schedule[-1].at if schedule else 0.0
    try:
        await asyncio.wait_for(gathered, timeout=span + REQUEST_TIMEOUT_S + 30)
    finally:
        for task in tasks:
            task.cancel()
    return results


def _retrieve(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()


def summarize_chats(
    results: Sequence[ChatResult], lo: float, hi: float, names: dict[str, str]
) -> dict[str, Any]:
    """Figures of the turns scheduled in [lo, hi): latencies in ms, shares and hit rates in
    0..1 (token-weighted, from the engines' usage; ``miss_share``: turns that found less than
    half their prompt cached)."""
    measured = [r for r in results if lo <= r.turn.at < hi]
    ok = [r for r in measured if r.ok]
    lat = [r.latency * 1000 for r in ok]
    ttft = [r.ttft * 1000 for r in ok if r.turn.stream and not math.isnan(r.ttft)]
    errors = Counter(r.error for r in measured if not r.ok)
    by_node = Counter(names.get(r.node, r.node or "?") for r in ok)
    first = total(r.tokens for r in ok if r.turn.turn == 0)
    later = total(r.tokens for r in ok if r.turn.turn > 0)
    misses = sum(1 for r in ok if r.tokens.cached * 2 < r.tokens.prompt)
    return {
        "requests": len(measured),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": [f"{r.error}: {r.detail}" for r in measured if not r.ok][:ERROR_SAMPLES],
        "mean_ms": statistics.fmean(lat) if lat else math.nan,
        "p50_ms": quantile(lat, 0.5),
        "p90_ms": quantile(lat, 0.9),
        "p99_ms": quantile(lat, 0.99),
        "ttft_p50_ms": quantile(ttft, 0.5),
        "ttft_p90_ms": quantile(ttft, 0.9),
        "hit_rate": (first + later).hit_rate,
        "hit_rate_first": first.hit_rate,
        "hit_rate_later": later.hit_rate,
        "prompt_tokens": (first + later).prompt,
        "cached_tokens": (first + later).cached,
        "miss_share": misses / len(ok) if ok else math.nan,
        "held": sum(1 for r in measured if r.held_s > 0.05),
        "shares": {n: by_node.get(n, 0) / len(ok) if ok else 0.0 for n in names.values()},
    }


def median_chats(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over runs of each :func:`summarize_chats` figure (NaN runs left out); error
    kinds added up."""
    out: dict[str, Any] = {}
    for key in NUMERIC:
        values = [r[key] for r in runs if not math.isnan(r[key])]
        out[key] = statistics.median(values) if values else math.nan
    out["shares"] = {
        name: statistics.median(r["shares"][name] for r in runs) for name in runs[0]["shares"]
    }
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["error_kinds"])
    out["error_kinds_total"] = dict(kinds)
    out["error_samples"] = [s for r in runs for s in r["error_samples"]][:ERROR_SAMPLES]
    return out
