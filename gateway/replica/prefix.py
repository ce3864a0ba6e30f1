"""The prompt's prefix chain for ``--strategy cache_aware``: what a request's prompt is, cut in
blocks, each named by a hash chained over every block before it; and how an engine's own count
of cached tokens corrects what the index predicted.

Engines (vLLM, SGLang, LMDeploy, llama.cpp) reuse the KV cache of a prompt's prefix only
behind the same prefix, keyed by hashes chained over tokens. The gateway has no tokenizer: it
chains over fixed blocks of the *canonical prompt* instead, the UTF-8 bytes of (chat) the tools
and every message's role and content in order, or (completions) the prompt. Bytes, not
characters, because they track tokens more evenly across scripts (about 4 per token in English,
2 to 3 in CJK). Only full blocks are hashed (engines cache full blocks only), at most
:data:`~shared_state.MAX_CHAIN_BLOCKS` of them, and the chain starts from the model's name, so
two models' prompts never share a block.

Invariants: the chain of a prompt extended at its end (a conversation's next turn) starts with
the earlier prompt's chain; the same prompt gives the same chain on every replica configured
with the same block size. Only cache_aware requests are decoded past ``model``, ``stream``
and ``user``, and a body this module cannot read is routed without a chain (the node judges it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

from shared_state import MAX_CHAIN_BLOCKS

DEFAULT_BLOCK_BYTES = 256  # about 64 tokens: engines' KV blocks are 16 to 64 tokens
CHAIN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

# Separators of roles, contents and messages: they keep ("ab", "c") apart from ("a", "bc"). A
# prompt holding them itself risks no more than a rare false match, which feedback corrects.
_ROLE, _END, _PART = b"\x1f", b"\x1e", b"\x1d"


class _Image(msgspec.Struct):
    url: str | None = None


class _Part(msgspec.Struct):
    text: str | None = None
    image_url: _Image | str | None = None


class _Message(msgspec.Struct):
    role: str | None = None
    content: str | list[_Part] | None = None
    tool_calls: msgspec.Raw = msgspec.Raw()  # kept as sent: cheaper than decoding it


class PromptView(msgspec.Struct):
    """The fields a cache_aware request is read for: the routing ones and the prompt."""

    model: str | None = None
    stream: bool | None = None
    user: str | None = None
    previous_response_id: str | None = None
    messages: list[_Message] | None = None
    prompt: str | list[Any] | None = None
    tools: msgspec.Raw = msgspec.Raw()


_decode_prompt = msgspec.json.Decoder(PromptView).decode


@dataclass(frozen=True, slots=True)
class PrefixChain:
    """A prompt's chain: ``blocks`` (hex hashes, first block first), the canonical prompt's
    ``size`` in bytes (its last partial block included) and the ``block_bytes`` it was cut in."""

    blocks: tuple[str, ...]
    size: int
    block_bytes: int

    def forgotten(self, matched: int, prompt_tokens: int, cached_tokens: int) -> tuple[str, ...]:
        """The blocks to forget on the node that answered, when it reported ``cached_tokens``
        of ``prompt_tokens`` and the index had predicted ``matched`` blocks: every block from
        the first it did not really hold to the end; none when the prediction held.

        The engine's fraction of cached tokens is applied to the canonical prompt's bytes (its
        template's tokens dilute it a little), with one block of slack for that and for the
        engine's own block rounding, so only a real miss is corrected.
        """
        if matched <= 0 or prompt_tokens <= 0 or cached_tokens < 0:
            return ()
        held = 0
        if cached_tokens > 0:
            cached_bytes = min(cached_tokens, prompt_tokens) / prompt_tokens * self.size
            held = int(cached_bytes // self.block_bytes) + 1
        if held >= matched:
            return ()
        return self.blocks[held:]


def read_prompt(body: bytes, path: str, block_bytes: int) -> tuple[PromptView, PrefixChain] | None:
    """The request and its prompt's chain; None when the body is not one this module reads
    (the caller decodes it the usual way, which says what is wrong with it, if anything)."""
    try:
        view = _decode_prompt(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    if not view.model:
        return None
    text = canonical_prompt(view) if path in CHAIN_PATHS else b""
    return view, derive_chain(view.model, text, block_bytes)


def canonical_prompt(view: PromptView) -> bytes:
    """The prompt as the chain covers it: chat's tools and messages, or the prompt."""
    out: list[bytes] = []
    if view.messages is not None:
        tools = bytes(view.tools)
        if tools and tools != b"null":
            out += (tools, _END)
        for message in view.messages:
            out += ((message.role or "").encode(), _ROLE)
            content = message.content
            if isinstance(content, str):
                out.append(content.encode())
            elif content is not None:
                for part in content:
                    if part.text is not None:
                        out.append(part.text.encode())
                    image = part.image_url
                    url = image.url if isinstance(image, _Image) else image
                    if url:
                        out += (_PART, url.encode())
            calls = bytes(message.tool_calls)
            if calls and calls != b"null":
                out += (_PART, calls)
            out.append(_END)
        return b"".join(out)
    prompt = view.prompt
    if isinstance(prompt, list):
        # A batch: the engine caches each prompt; the first stands for the request. A prompt of
        # token ids is its ids written out.
        first = prompt[0] if prompt else ""
        if isinstance(first, str):
            prompt = first
        elif isinstance(first, list):
            prompt = ",".join(str(t) for t in first)
        else:
            prompt = ",".join(str(t) for t in prompt)
    return prompt.encode() if isinstance(prompt, str) else b""


def derive_chain(model: str, text: bytes, block_bytes: int) -> PrefixChain:
    """Hash the full blocks of ``text`` (at most MAX_CHAIN_BLOCKS), each over the one before:
    blake2b of the previous 8-byte digest and the block, the first over the model's name."""
    count = min(len(text) // block_bytes, MAX_CHAIN_BLOCKS)
    digest = hashlib.blake2b(model.encode(), digest_size=8).digest()
    view = memoryview(text)
    blocks: list[str] = []
    for start in range(0, count * block_bytes, block_bytes):
        step = hashlib.blake2b(digest, digest_size=8)
        step.update(view[start : start + block_bytes])
        digest = step.digest()
        blocks.append(digest.hex())
    return PrefixChain(tuple(blocks), len(text), block_bytes)
