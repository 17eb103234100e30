"""OpenAI-compatible chat completions (OpenAI, vLLM, ``steerlab serve``, the Pi API) with
bounded retries, bounded concurrency and structured output.

The API key is read from a named environment variable when a client is built, never stored in
records or files, and scrubbed from every error message this module produces.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

from steerlab.base.errors import SteerlabError

__all__ = ["Endpoint", "EndpointClient", "MalformedResponse", "parse_json_reply",
           "validate_json", "bounded_map"]

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class MalformedResponse(RuntimeError):
    """The server answered, but not with a usable chat completion (or not with valid JSON)."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach an OpenAI-compatible server.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name sent with each request.
        api_key_env: name of the environment variable holding the key (``None``: no key),
            sent as ``Authorization: Bearer <key>``; ``"STEERLAB_API_KEY"`` for a
            ``steerlab serve`` started with that key.
        timeout: seconds per request.
        max_retries: retries after the first attempt on 429, 5xx, timeouts, malformed replies.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at 20 s.
        concurrency: requests in flight at once.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    concurrency: int = 8


def _retryable(err: BaseException) -> bool:
    import openai  # deferred: openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError, MalformedResponse,
                        openai.APIResponseValidationError, json.JSONDecodeError)):
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code == 429 or err.status_code >= 500
    return False


class EndpointClient:
    """A thread-safe chat-completions client for one :class:`Endpoint`.

    Examples:
        >>> c = sl.EndpointClient(sl.Endpoint("http://127.0.0.1:8000/v1", "embedded", None))
        >>> c.chat([{"role": "user", "content": "Hi"}], max_tokens=16)  # doctest: +SKIP
    """

    def __init__(self, endpoint: Endpoint, *, sleep: Callable[[float], None] = time.sleep):
        import openai  # deferred: openai

        self.endpoint = endpoint
        key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        if endpoint.api_key_env and not key:
            raise SteerlabError(f"environment variable {endpoint.api_key_env} is not set",
                                field="api_key_env")
        self._secrets = [key] if key else []
        self._sleep = sleep
        self.calls = 0  # HTTP attempts made, retries included
        self._sdk = openai.OpenAI(base_url=endpoint.base_url, api_key=key or "none",
                                  timeout=endpoint.timeout, max_retries=0)

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _with_retries(self, call: Callable[[], T]) -> T:
        ep = self.endpoint
        for attempt in range(ep.max_retries + 1):
            try:
                self.calls += 1
                return call()
            except Exception as err:  # noqa: BLE001 - classified below
                if not _retryable(err) or attempt == ep.max_retries:
                    raise RuntimeError(self.scrub(f"{type(err).__name__}: {err}")) from None
                delay = min(20.0, ep.backoff * 2**attempt) * (0.5 + random.random() / 2)
                log.debug("retry %d after %s (%.2fs)", attempt + 1, type(err).__name__, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _create(self, messages: Sequence[dict], **kwargs: Any) -> str:
        raw = self._sdk.chat.completions.create(model=self.endpoint.model,
                                                messages=list(messages), **kwargs)
        try:
            content = raw.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise MalformedResponse(f"not a chat completion: {str(raw)[:200]!r}") from None
        if not isinstance(content, str):
            raise MalformedResponse("the reply has no message content")
        return content

    def chat(self, messages: Sequence[dict], *, max_tokens: int = 256, temperature: float = 0.0,
             extra_body: dict | None = None, seed: int | None = None) -> str:
        """One chat completion's text, retried on transient failures.

        Args:
            messages: ``[{"role": ..., "content": ...}]``.
            max_tokens: completion budget.
            temperature: 0 for greedy.
            extra_body: extra request fields (``persona``, ``steering`` for ``steerlab serve``).
            seed: sampling seed, where the server honours it.
        """
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if extra_body:
            kwargs["extra_body"] = extra_body
        if seed is not None:
            kwargs["seed"] = seed
        return self._with_retries(lambda: self._create(messages, **kwargs))

    def chat_json(self, messages: Sequence[dict], schema: dict, *, name: str = "reply",
                  max_tokens: int = 1024, temperature: float = 0.0) -> Any:
        """A reply that parses as JSON and satisfies ``schema``.

        Asks for ``response_format`` JSON schema; if the server rejects that (HTTP 400/422),
        asks again without it. Either way the text is parsed (code fences and surrounding prose
        tolerated) and validated, and a reply that fails counts as malformed (retried).
        """
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                      "strict": False}}
        use_format = [True]

        def call() -> Any:
            import openai  # deferred: openai

            kwargs: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
            if use_format[0]:
                try:
                    text = self._create(messages, response_format=fmt, **kwargs)
                except openai.APIStatusError as err:
                    if err.status_code not in (400, 422):
                        raise
                    log.info("server rejected response_format; parsing plain replies")
                    use_format[0] = False
                    text = self._create(messages, **kwargs)
            else:
                text = self._create(messages, **kwargs)
            try:
                value = parse_json_reply(text)
                validate_json(value, schema)
            except ValueError as err:
                raise MalformedResponse(str(err)) from None
            return value

        return self._with_retries(call)


def parse_json_reply(text: str) -> Any:
    """The first JSON value in a model reply (inside a ```json fence, or the outermost braces).

    Examples:
        >>> parse_json_reply('Sure! ```json\\n{"score": 80}\\n```')
        {'score': 80}
    """
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i : j + 1])
    for c in candidates:
        try:
            return json.loads(c.strip())
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON value in the reply {text[:120]!r}")


_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,),
                                       "number": (int, float), "integer": (int,),
                                       "boolean": (bool,), "null": (type(None),)}


def validate_json(value: Any, schema: dict, path: str = "$") -> None:
    """Check ``value`` against the JSON-schema subset used here: type, properties, required,
    items, minItems, minimum, maximum. Raises ``ValueError`` naming the path."""
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("number", "integer") and isinstance(value, bool))
        if not ok:
            raise ValueError(f"{path}: expected {kind}, got {value!r:.60}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{path}: missing required field {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate_json(value[key], sub, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise ValueError(f"{path}: expected at least {schema['minItems']} items")
        for i, item in enumerate(value):
            validate_json(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError(f"{path}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError(f"{path}: {value} is above {schema['maximum']}")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int
                ) -> Iterator[tuple[int, R | BaseException]]:
    """Run ``fn`` over ``items`` on at most ``concurrency`` threads; yield ``(index, result or
    exception)`` as each finishes, so callers can record results incrementally.

    Examples:
        >>> dict(bounded_map(len, ["a", "bb"], 2))
        {0: 1, 1: 2}
    """
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            err = fut.exception()
            yield futures[fut], (err if err is not None else fut.result())
