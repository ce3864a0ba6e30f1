"""Multi-turn chats sharing long system prompts: the workload of the benchmarks in which
prefix caches matter (the routing benchmark on real ``llama-server``s; a cache benchmark on
simulated nodes with ``--cache-blocks`` can drive the same schedule).

A conversation opens with one of a few long system prompts, the part many conversations
share, then alternates short user messages with the engine's answers; its next turn re-sends
the whole history, the part only that conversation shares. An engine that still holds a
prompt's prefix in its cache skips that part of the prefill, so where a turn is routed decides
how long it takes.

Invariants:

- Everything is drawn from seeded generators: the same seed gives the same system prompts,
  user messages and schedule on every machine. Texts are words from a fixed list of common
  English words (a simulated node counts each word as a token; llama's tokenizer about 1.05
  tokens per word), and every system prompt opens with its own number, so two of them share
  no prefix beyond their first words.
- The schedule is a Poisson process conditioned on its count (exactly ``round(rate * span)``
  arrivals at independent uniform times, as :func:`scripts.bench.scenario.make_schedule`), its
  arrivals dealt to conversations: an arrival is the next turn of a conversation whose previous
  turn was scheduled at least ``min_gap_s`` earlier (one drawn uniformly among those), else the
  first turn of a new one. A conversation ends after ``turns`` turns. So a turn's predecessor is
  always scheduled before it, and usually answered before it is due; a load generator still
  holds a turn until its predecessor's answer is in, as a chat client would.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Common one-token words: random text of them tokenizes about one token per word.
_WORDS = tuple(
    """the of and to in is that for it as with was on be by at this are from or have an they
    which one you were all we her she there would their will when who him been has more if no
    out do so can what up said about other into than its time only could new them man some
    these then two first may any like now my such make over our even most me state after also
    made many before must through back years where much your way down should because long each
    just used people""".split()
)


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    """The chats' shape: ``prompts`` system prompts of ``prompt_words`` words, conversations of
    ``turns`` turns with user messages of ``user_words`` words and answers of ``answer_tokens``
    tokens, ``conversations`` of them open at once, turns of one conversation scheduled at least
    ``min_gap_s`` apart, ``stream_fraction`` of the turns streamed."""

    prompts: int = 8
    prompt_words: int = 800
    turns: int = 4
    user_words: int = 40
    answer_tokens: int = 16
    conversations: int = 12
    min_gap_s: float = 4.0
    stream_fraction: float = 0.5

    def describe(self) -> dict[str, Any]:
        """The workload as results record it."""
        return {
            "prompts": self.prompts,
            "prompt_words": self.prompt_words,
            "turns": self.turns,
            "user_words": self.user_words,
            "answer_tokens": self.answer_tokens,
            "conversations": self.conversations,
            "min_gap_s": self.min_gap_s,
            "stream_fraction": self.stream_fraction,
        }


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One scheduled request: turn ``turn`` (0 first) of conversation ``chat``, which opened
    with system prompt ``system``."""

    at: float  # s after the start of the run
    chat: int
    turn: int
    system: int
    stream: bool
    u: float  # uniform in [0, 1): picks the replica, as an L4 balancer would


def words(seed: str, count: int) -> str:
    """``count`` words drawn from the fixed list by a generator seeded with ``seed``."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def system_prompt(index: int, count: int) -> str:
    """System prompt number ``index``: its number first, then ``count`` words of its own."""
    return f"You are assistant number {index}. " + words(f"system-{index}", count)


def user_message(seed: int, chat: int, turn: int, count: int) -> str:
    """What the user says in turn ``turn`` of conversation ``chat`` of run seed ``seed``."""
    return words(f"user-{seed}-{chat}-{turn}", count)


def messages(
    workload: ChatWorkload, seed: int, turn: ChatTurn, answers: Sequence[str]
) -> list[dict[str, str]]:
    """The messages of ``turn``: its system prompt, each earlier turn's user message and the
    answer it got (``answers``, one per earlier turn), then this turn's user message."""
    if len(answers) != turn.turn:
        raise ValueError(f"turn {turn.turn} needs {turn.turn} earlier answers, not {len(answers)}")
    out = [{"role": "system", "content": system_prompt(turn.system, workload.prompt_words)}]
    for k, answer in enumerate(answers):
        out.append(
            {"role": "user", "content": user_message(seed, turn.chat, k, workload.user_words)}
        )
        out.append({"role": "assistant", "content": answer})
    out.append(
        {"role": "user", "content": user_message(seed, turn.chat, turn.turn, workload.user_words)}
    )
    return out


@dataclass(slots=True)
class _Open:
    chat: int
    system: int
    turns: int = 0
    last_at: float = float("-inf")


def make_chat_schedule(
    seed: int, rate: float, span_s: float, workload: ChatWorkload
) -> list[ChatTurn]:
    """The turns of a run at ``rate`` requests/s over ``span_s`` s, sorted by time; the same
    arguments give the same list (see the module's docstring for how they are dealt)."""
    rng = random.Random(f"chat-schedule-{seed}")
    times = sorted(rng.uniform(0.0, span_s) for _ in range(round(rate * span_s)))
    opened: list[_Open] = []
    next_chat = 0

    def open_chat() -> _Open:
        nonlocal next_chat
        chat = _Open(next_chat, rng.randrange(workload.prompts))
        next_chat += 1
        opened.append(chat)
        return chat

    for _ in range(workload.conversations):
        open_chat()
    out: list[ChatTurn] = []
    for at in times:
        ready = [c for c in opened if at - c.last_at >= workload.min_gap_s]
        chat = rng.choice(ready) if ready else open_chat()
        stream = rng.random() < workload.stream_fraction
        out.append(ChatTurn(at, chat.chat, chat.turns, chat.system, stream, rng.random()))
        chat.turns += 1
        chat.last_at = at
        if chat.turns == workload.turns:
            opened.remove(chat)
            open_chat()
    return out
