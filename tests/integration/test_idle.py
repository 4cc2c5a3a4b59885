"""An idle gateway sleeps: its timers run only while there is work for them.

The listener's timer ticks every 50 ms only while a stream waits for its watcher, the
upstream pools' deadline timer only while a whole answer waits for bytes, the access log
and the audit writer only while they hold records; otherwise each sleeps until work comes
(the connection scan runs every second).  Counted with a trio instrument (task steps per task), in the test's
own event loop, where the gateway runs.
"""
from __future__ import annotations

from collections import Counter

import httpx
import trio
import trio.abc

from tests.support.mock_openai import serve_mock_openai


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.by_task: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.by_task[task.name] += 1


async def test_an_idle_gateway_wakes_about_once_a_second_per_timer(gateway_factory) -> None:
    async with serve_mock_openai() as mock, gateway_factory(env={
            "OPENAI_API_KEY": "sk-upstream", "OPENAI_BASE_URL": mock.base_url}) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as client:
            for stream in (False, True):  # a whole answer (the pools' timer), a stream (a watcher)
                resp = await client.post("/chat/completions", json={
                    "model": "gpt-4o-mini", "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 200
        await gw.log.wait_for(2, "/v1/chat/completions")
        audit = gw.app.gateway.audit
        with trio.fail_after(5):
            while audit.statistics()["audit_written"] < 2:  # the writer's last flush
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # the last ticks after the requests
        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            await trio.sleep(2.0)
        finally:
            trio.lowlevel.remove_instrument(steps)
        # Before: the listener's timer took 40 steps in these 2 s, the access log 10, the
        # pools' timer 100 and the audit writer 11.  Now: the connection scan once a second.
        by = steps.by_task
        assert by["gwcore.server.listener.Server._expire_loop"] <= 3, by
        assert by["gwcore.accesslog.AccessLog.run"] == 0, by
        assert by["gwcore.transport.NativePools.run"] == 0, by
        assert by["gwcore.stores.audit.SQLStoreBase.run"] == 0, by
        assert sum(by.values()) <= 6, by
