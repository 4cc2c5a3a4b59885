"""Rate limits (gwnative buckets) and the response cache (gwnative cache keys), end to end."""
from __future__ import annotations

import httpx
import openai
import pytest
import trio

from gwcore.ratelimit import format_duration
from tests.integration.test_openai_sdk import MESSAGES, client, in_thread, stack

LIMITED = """
keys:
  - {key: rpm-key-000001, name: rpm3, rpm: 3}
  - {key: tpm-key-000001, name: tpm, tpm: 600}
  - {key: conc-key-00001, name: conc, max_concurrency: 1}
limits:
  default: {requests: 1000, window_s: 3600}
  models:
    gpt-4o: {requests: 2, window_s: 60}
"""


async def test_requests_per_minute_per_key_with_openai_headers(gateway_factory):
    async with stack(gateway_factory, LIMITED) as (gw, mock):
        c = client(gw, key="rpm-key-000001")
        remaining = []
        for _ in range(3):
            raw = await in_thread(c.chat.completions.with_raw_response.create,
                                  model="gpt-4o-mini", messages=MESSAGES)
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [2, 1, 0]
        with pytest.raises(openai.RateLimitError) as err:
            await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
        assert err.value.code == "rate_limit_exceeded"
        assert err.value.response.headers["retry-after"] == "20"  # 1 request per 20 s
        assert int(err.value.response.headers["retry-after-ms"]) <= 20000
        assert mock.counts["/v1/chat/completions"] == 3
        # Another key is not affected.
        await in_thread(client(gw).chat.completions.create, model="gpt-4o-mini",
                        messages=MESSAGES)


async def test_token_reservations_settle_to_real_usage(gateway_factory):
    async with stack(gateway_factory, LIMITED) as (gw, mock):
        c = client(gw, key="tpm-key-000001")
        # Each call reserves ~bytes/4 + 200 = ~240; the mock's answers use ~21 tokens and
        # the difference comes back.  Unsettled, ten calls would need 2,400 tokens.
        for _ in range(5):
            raw = await in_thread(c.chat.completions.with_raw_response.create,
                                  model="gpt-4o-mini", messages=MESSAGES, max_tokens=200)
            assert raw.headers["x-ratelimit-limit-tokens"] == "600"
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as err:
                await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                                messages=MESSAGES, max_tokens=5000, stream=stream)
            assert "more tokens than the limit" in err.value.message
        # Streams settle too: five more streamed calls still fit.
        for _ in range(5):
            with await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                                 messages=MESSAGES, max_tokens=200, stream=True) as s:
                await in_thread(list, s)


async def test_per_model_limit_is_shared_by_all_keys(gateway_factory):
    async with stack(gateway_factory, LIMITED) as (gw, mock):
        await in_thread(client(gw).chat.completions.create, model="gpt-4o", messages=MESSAGES)
        await in_thread(client(gw, key="rpm-key-000001").chat.completions.create,
                        model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as err:
            await in_thread(client(gw).chat.completions.create, model="gpt-4o",
                            messages=MESSAGES)
        assert "the model 'gpt-4o'" in err.value.message


async def test_concurrency_cap_per_key(gateway_factory):
    async with stack(gateway_factory, LIMITED, tokens_per_s=20) as (gw, mock):
        headers = {"authorization": "Bearer conc-key-00001"}
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        async with httpx.AsyncClient() as h:
            async with h.stream("POST", f"{gw.base_url}/chat/completions", headers=headers,
                                json=body) as first:
                assert first.status_code == 200
                second = await h.post(f"{gw.base_url}/chat/completions", headers=headers,
                                      json={**body, "stream": False})
                assert second.status_code == 429
                await first.aread()
            third = await h.post(f"{gw.base_url}/chat/completions", headers=headers,
                                 json={**body, "stream": False})
            assert third.status_code == 200


CACHED = "cache: {enabled: true, ttl_s: 60, max_entries: 100}\n"


async def test_cache_hits_skip_the_upstream_and_replay_as_a_stream(gateway_factory):
    async with stack(gateway_factory, CACHED) as (gw, mock):
        c = client(gw)
        calls = lambda: mock.counts["/v1/chat/completions"]  # noqa: E731
        first = await in_thread(c.chat.completions.with_raw_response.create,
                                model="gpt-4o-mini", messages=MESSAGES, user="alice")
        assert first.headers["x-gateway-cache"] == "MISS"
        second = await in_thread(c.chat.completions.with_raw_response.create,
                                 model="gpt-4o-mini", messages=MESSAGES, user="bob")
        assert second.headers["x-gateway-cache"] == "HIT"  # `user` does not count
        assert second.parse().choices[0].message.content == mock.reply
        assert calls() == 1
        # A streamed request for the same answer is served from the cache as a stream.
        with await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                             messages=MESSAGES, stream=True,
                             stream_options={"include_usage": True}) as s:
            chunks = await in_thread(list, s)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == mock.reply
        assert chunks[-1].usage.completion_tokens == len(mock.reply.split())
        assert calls() == 1
        # A counted field changes the key.
        await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES,
                        temperature=0.5)
        assert calls() == 2
        # no-cache skips the lookup, no-store skips the store.
        await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES,
                        extra_headers={"Cache-Control": "no-cache"})
        assert calls() == 3
        fresh = MESSAGES + [{"role": "user", "content": "something new"}]
        await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=fresh,
                        extra_headers={"Cache-Control": "no-store"})
        raw = await in_thread(c.chat.completions.with_raw_response.create,
                              model="gpt-4o-mini", messages=fresh)
        assert raw.headers["x-gateway-cache"] == "MISS"
        assert calls() == 5


async def test_a_streamed_answer_is_stored_and_another_key_does_not_see_it(gateway_factory):
    yaml_text = CACHED + "keys:\n  - {key: other-key-00001, name: other}\n"
    async with stack(gateway_factory, yaml_text) as (gw, mock):
        c = client(gw)
        with await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                             messages=MESSAGES, stream=True) as s:
            await in_thread(list, s)
        raw = await in_thread(c.chat.completions.with_raw_response.create,
                              model="gpt-4o-mini", messages=MESSAGES)
        assert raw.headers["x-gateway-cache"] == "HIT"
        assert raw.parse().choices[0].message.content == mock.reply
        # Scope "key" (the default): another key's identical request is a miss.
        raw = await in_thread(client(gw, key="other-key-00001").chat.completions.with_raw_response.create,
                              model="gpt-4o-mini", messages=MESSAGES)
        assert raw.headers["x-gateway-cache"] == "MISS"
        assert mock.counts["/v1/chat/completions"] == 2
        await trio.sleep(0)


def test_reset_durations_look_like_openais():
    assert format_duration(0.02) == "20ms"
    assert format_duration(1) == "1s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"
