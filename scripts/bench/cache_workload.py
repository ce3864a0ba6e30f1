"""The cache benchmark's workload (scripts/bench_cache.py): a bounded set of multi-turn chats
sharing a few long system prompts, as SGLang's generated-shared-prefix and multi-turn
benchmarks have them, dealt to Poisson arrivals; and what it takes of a node and of the
gateway's prefix index, in their own units.

The texts are those of scripts/bench/chats.py (its system prompts, user messages and message
lists): only the schedule differs. There, conversations open for as long as the run lasts; here
a run is a fixed set of ``conversations``, each with its own system prompt and its own number
of turns (``min_turns`` to ``max_turns``), so it ends when they do.

Invariants:

- The same seed gives the same conversations and the same schedule on every machine.
- A run has exactly as many arrivals as its conversations have turns, at independent uniform
  times over ``turns / rate`` seconds (a Poisson process at ``rate`` conditioned on its count).
  Each arrival is the next turn of an open conversation whose previous turn is at least
  ``min_gap_s`` older (one drawn uniformly among those), else the first turn of the next
  conversation; at most ``open_at_once`` are open while others wait, unless none is ready.
  When every conversation has opened and none is ready, the arrival goes to the one that
  waited longest. A load generator still holds a turn until its predecessor's answer is in.
- A turn's prompt is its system prompt, then every earlier user message and answer, then its
  own user message: the whole conversation so far, as a chat client re-sends it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.replica.prefix import read_prompt
from scripts.bench.chat_load import request_body
from scripts.bench.chats import ChatTurn, ChatWorkload, system_prompt

SIM_ANSWER = "tok{} "  # a simulated node answers "tok0 tok1 ..."


@dataclass(frozen=True, slots=True)
class CacheWorkload:
    """``prompts`` system prompts of ``prompt_words`` words; ``conversations`` chats of
    ``min_turns`` to ``max_turns`` turns, questions of ``user_words`` words, answers of
    ``answer_tokens`` tokens; at most ``open_at_once`` chats open while others wait, turns of
    one at least ``min_gap_s`` apart; ``stream_fraction`` of the turns streamed."""

    prompts: int = 8
    prompt_words: int = 1000
    conversations: int = 64
    min_turns: int = 4
    max_turns: int = 6
    user_words: int = 40
    answer_tokens: int = 32
    open_at_once: int = 16
    min_gap_s: float = 1.0
    stream_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.conversations < 1 or self.open_at_once < 1:
            raise ValueError("prompts, conversations and open_at_once must be >= 1")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError("1 <= min_turns <= max_turns")
        if self.prompt_words < 0 or self.user_words < 1 or self.answer_tokens < 1:
            raise ValueError("prompt_words >= 0, user_words and answer_tokens >= 1")

    def chats(self) -> ChatWorkload:
        """The same texts in scripts/bench/chats.py's terms (what its message lists read)."""
        return ChatWorkload(
            prompts=self.prompts,
            prompt_words=self.prompt_words,
            turns=self.max_turns,
            user_words=self.user_words,
            answer_tokens=self.answer_tokens,
            conversations=self.open_at_once,
            min_gap_s=self.min_gap_s,
            stream_fraction=self.stream_fraction,
        )

    def describe(self) -> dict[str, Any]:
        """The workload as results record it."""
        return {
            "prompts": self.prompts,
            "prompt_words": self.prompt_words,
            "conversations": self.conversations,
            "min_turns": self.min_turns,
            "max_turns": self.max_turns,
            "user_words": self.user_words,
            "answer_tokens": self.answer_tokens,
            "open_at_once": self.open_at_once,
            "min_gap_s": self.min_gap_s,
            "stream_fraction": self.stream_fraction,
        }


@dataclass(frozen=True, slots=True)
class Conversation:
    """One chat of a run: its system prompt and how many turns it has."""

    system: int
    turns: int


def plan(seed: int, workload: CacheWorkload) -> list[Conversation]:
    """The conversations of run seed ``seed``: system prompts uniform among the workload's,
    turns uniform in ``min_turns..max_turns``."""
    rng = random.Random(f"cache-chats-{seed}")
    return [
        Conversation(
            rng.randrange(workload.prompts), rng.randint(workload.min_turns, workload.max_turns)
        )
        for _ in range(workload.conversations)
    ]


@dataclass(slots=True)
class _Open:
    chat: int
    system: int
    left: int
    turns: int = 0
    last_at: float = float("-inf")


def make_cache_schedule(seed: int, rate: float, workload: CacheWorkload) -> list[ChatTurn]:
    """Every turn of the run's conversations at ``rate`` turns/s, sorted by time; the same
    arguments give the same list (see the module's docstring for how turns are dealt)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    chats = plan(seed, workload)
    count = sum(c.turns for c in chats)
    rng = random.Random(f"cache-schedule-{seed}")
    times = sorted(rng.uniform(0.0, count / rate) for _ in range(count))
    opened: list[_Open] = []
    waiting = list(enumerate(chats))[::-1]  # the next to open last

    def open_next() -> _Open:
        index, c = waiting.pop()
        chat = _Open(index, c.system, c.turns)
        opened.append(chat)
        return chat

    out: list[ChatTurn] = []
    for at in times:
        while waiting and len(opened) < workload.open_at_once:
            open_next()
        ready = [c for c in opened if at - c.last_at >= workload.min_gap_s]
        if ready:
            chat = rng.choice(ready)
        elif waiting:
            chat = open_next()
        else:
            chat = min(opened, key=lambda c: c.last_at)
        stream = rng.random() < workload.stream_fraction
        out.append(ChatTurn(at, chat.chat, chat.turns, chat.system, stream, rng.random()))
        chat.turns += 1
        chat.last_at = at
        if chat.turns == chat.left:
            opened.remove(chat)
    return out


def prompt_tokens(workload: CacheWorkload, turn: int) -> int:
    """A simulated node's prompt tokens (words) in turn ``turn`` (0 first) of a conversation
    whose answers were whole."""
    system = len(system_prompt(0, workload.prompt_words).split())
    return system + (turn + 1) * workload.user_words + turn * workload.answer_tokens


def mean_prompt_tokens(workload: CacheWorkload) -> float:
    """The mean prompt of a turn, over conversations of every length alike."""
    lengths = range(workload.min_turns, workload.max_turns + 1)
    tokens = [prompt_tokens(workload, k) for n in lengths for k in range(n)]
    return sum(tokens) / len(tokens)


def sim_answer(tokens: int) -> str:
    """What a simulated node answers with ``tokens`` tokens."""
    return "".join(SIM_ANSWER.format(i) for i in range(tokens))


def bytes_per_token(workload: CacheWorkload, model: str, answers: Sequence[str] = ()) -> float:
    """Bytes of the gateway's canonical prompt (roles, separators and contents) per prompt word,
    over one conversation of ``max_turns`` turns answered with ``answers`` (default: a simulated
    node's answers); what turns a node's cache in words into the gateway's 256-byte blocks."""
    chats = workload.chats()
    said = list(answers) or [sim_answer(workload.answer_tokens)] * workload.max_turns
    size = words = 0
    for k in range(workload.max_turns):
        turn = ChatTurn(0.0, 0, k, 0, False, 0.0)
        body = request_body(model, chats, 0, turn, said[:k])
        read = read_prompt(json.dumps(body).encode(), "/v1/chat/completions", 256)
        assert read is not None
        size += read[1].size
        words += sum(len(m["content"].split()) for m in body["messages"])
    return size / words


def gateway_blocks(sim_blocks: int, block_tokens: int, per_token: float, block_bytes: int) -> int:
    """A simulated node's ``sim_blocks`` of ``block_tokens`` words each, in the gateway's blocks
    of ``block_bytes`` bytes of canonical prompt at ``per_token`` bytes per word (at least 1)."""
    return max(1, round(sim_blocks * block_tokens * per_token / block_bytes))
