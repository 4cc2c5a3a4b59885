"""The built-in ``mock`` provider: deterministic OpenAI-format answers, no network.

Used by ``gwcore serve --demo`` and by tests.  This module only makes bytes; pacing
(``latency_ms`` before the answer, ``tokens_per_s`` between stream chunks, both read
from the deployment's ``base_url`` query, e.g. ``mock://local?tokens_per_s=20``) is
applied by the mock transport in ``gwcore.upstream``.

The reply is a function of the request alone, so the same request gets the same
answer (handy for cache tests), and token counts follow a fixed rule: a prompt token
per 4 characters of message text (at least 1), a completion token per reply word.
"""
from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

MODELS = ("mock-1", "gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "gemini-2.0-flash",
          "text-embedding-3-small")


def pacing(base_url: str | None) -> tuple[float, float]:
    """(latency_s, tokens_per_s) from a ``mock://...?latency_ms=&tokens_per_s=`` URL."""
    if not base_url:
        return 0.0, 0.0
    q = parse_qs(urlsplit(base_url).query)
    try:
        latency = float(q.get("latency_ms", ["0"])[0]) / 1000.0
        rate = float(q.get("tokens_per_s", ["0"])[0])
    except ValueError:
        return 0.0, 0.0
    return max(latency, 0.0), max(rate, 0.0)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _digest(body: dict[str, Any]) -> str:
    return hashlib.blake2b(orjson.dumps(body.get("messages"), option=orjson.OPT_SORT_KEYS),
                           digest_size=8).hexdigest()


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


def prompt_tokens(body: dict[str, Any]) -> int:
    messages = _messages(body)
    chars = sum(len(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    return max(1, chars // 4)


def reply_words(body: dict[str, Any]) -> list[str]:
    messages = _messages(body)
    last = ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            last = _text_of(m.get("content"))
            break
    echo = last.split()[:12]
    words = ["This", "is", "a", "mock", "reply", "from", "gwcore."]
    if echo:
        words += ["You", "said:"] + echo
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        words = words[:limit]
    return words


def _finish(body: dict[str, Any], words: list[str]) -> str:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    full = len(reply_words({**body, "max_tokens": None, "max_completion_tokens": None}))
    return "length" if isinstance(limit, int) and 0 < limit < full else "stop"


def _usage(body: dict[str, Any], words: list[str]) -> dict[str, Any]:
    p, c = prompt_tokens(body), len(words)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def chat_completion(body: dict[str, Any], model: str, created: int) -> bytes:
    words = reply_words(body)
    return orjson.dumps({
        "id": f"chatcmpl-mock{_digest(body)}", "object": "chat.completion",
        "created": created, "model": model, "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": _finish(body, words)}],
        "usage": _usage(body, words),
    })


def chat_stream(body: dict[str, Any], model: str, created: int) -> list[bytes]:
    """The SSE events of a streamed answer, one ``data: ...\\n\\n`` item per chunk."""
    words = reply_words(body)
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    base = {"id": f"chatcmpl-mock{_digest(body)}", "object": "chat.completion.chunk",
            "created": created, "model": model, "system_fingerprint": "fp_mock"}
    extra = {"usage": None} if with_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": finish}], **extra}
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    out = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    for i, w in enumerate(words):
        out.append(chunk({"content": w if i == 0 else " " + w}, None))
    out.append(chunk({}, _finish(body, words)))
    if with_usage:
        out.append(b"data: " + orjson.dumps({**base, "choices": [],
                                             "usage": _usage(body, words)}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def _vector(text: str, dims: int = 8) -> list[float]:
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=dims * 4).digest()
    return [round((x / 0xFFFFFFFF) * 2 - 1, 6) for x in struct.unpack(f"<{dims}I", h)]


def embeddings(body: dict[str, Any], model: str) -> bytes:
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else [x if isinstance(x, str) else str(x)
                                                  for x in (raw or [])]
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(inputs):
        vec = _vector(text)
        if b64:
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        else:
            emb = vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = max(1, sum(len(t) for t in inputs) // 4)
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def models(created: int) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "gwcore-mock"}
        for m in MODELS]})
