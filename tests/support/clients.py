"""Calling a gateway as a client does: the openai SDK, without retries of its own (a retry would
hide what the gateway did), and the smallest chat request, sent with or without an API key."""

from __future__ import annotations

import httpx
import openai
from openai import NOT_GIVEN, NotGiven

from tests.support import MODEL


def async_sdk(base_url: str, timeout: float | NotGiven = NOT_GIVEN) -> openai.AsyncOpenAI:
    """An async client of the gateway at ``base_url`` (its ``/v1`` API), with no API key."""
    return openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout
    )


def sdk(base_url: str, timeout: float | NotGiven = NOT_GIVEN) -> openai.OpenAI:
    """A blocking client of the gateway at ``base_url`` (its ``/v1`` API), with no API key."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout)


async def chat(
    http: httpx.AsyncClient, base_url: str, key: str | None, max_tokens: int = 1
) -> httpx.Response:
    """A chat completion of ``max_tokens`` tokens from the gateway at ``base_url``, sent with
    ``key`` as the bearer token (no authorization header when ``key`` is None)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return await http.post(
        f"{base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [], "max_tokens": max_tokens},
        headers=headers,
    )
