"""POST /v1/responses (OpenAI Responses API) passed through, with usage accounted."""
from __future__ import annotations

import openai
import pytest

from tests.integration.test_openai_sdk import client, in_thread, stack

ROUTES = """
models:
  - name: claude-route
    deployments: [{provider: anthropic, model: claude-3-5-haiku-latest, api_key: sk-a-123}]
"""


async def test_responses_plain_and_streamed_are_passed_through_and_accounted(gateway_factory):
    async with stack(gateway_factory, ROUTES) as (gw, mock):
        c = client(gw)
        r = await in_thread(c.responses.create, model="gpt-4o-mini", input="Hello there")
        assert r.output_text == mock.reply
        assert mock.requests[-1].json["model"] == "gpt-4o-mini"

        def streamed():
            with c.responses.stream(model="gpt-4o-mini", input="Hello there") as s:
                deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
                return deltas, s.get_final_response()

        deltas, final = await in_thread(streamed)
        assert "".join(deltas) == mock.reply
        plain, streamed_line = await gw.log.wait_for(2, "/v1/responses")
        assert plain["completion_tokens"] == final.usage.output_tokens == len(mock.reply.split())
        assert streamed_line["completion_tokens"] == plain["completion_tokens"]
        assert streamed_line["prompt_tokens"] == plain["prompt_tokens"] > 0
        assert plain["cost_usd"] == streamed_line["cost_usd"] > 0


async def test_responses_to_a_non_openai_route_is_a_clear_400(gateway_factory):
    async with stack(gateway_factory, ROUTES) as (gw, mock):
        with pytest.raises(openai.BadRequestError) as err:
            await in_thread(client(gw).responses.create, model="claude-route", input="hi")
        assert err.value.code == "unsupported_endpoint"
        assert "anthropic" in err.value.message
