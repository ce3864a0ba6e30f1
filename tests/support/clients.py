"""The openai SDK pointed at a gateway the way a client application uses it, without retries
of its own (a retry would hide what the gateway did)."""

from __future__ import annotations

import openai
from openai import NOT_GIVEN, NotGiven


def async_sdk(base_url: str, timeout: float | NotGiven = NOT_GIVEN) -> openai.AsyncOpenAI:
    """An async client of the gateway at ``base_url`` (its ``/v1`` API), with no API key."""
    return openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout
    )


def sdk(base_url: str, timeout: float | NotGiven = NOT_GIVEN) -> openai.OpenAI:
    """A blocking client of the gateway at ``base_url`` (its ``/v1`` API), with no API key."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout)
