"""ResultWriter: the worker's pipelined create-once result write, against a real server."""

from __future__ import annotations

import nats
import pytest
from nats.js.errors import NoStreamResponseError

from mesh.contract import Result
from mesh.results import ResultWriter, get_result
from mesh.topology import TopologySettings, declare_topology

pytestmark = pytest.mark.anyio


async def test_a_result_is_stored_once_and_a_second_write_reports_it(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await declare_topology(js, TopologySettings())
        writer = ResultWriter(nc)
        first = Result(id="rw-1", status="ok", output="first")
        assert await writer.write_once(first) is True
        assert await writer.write_once(Result(id="rw-1", status="ok", output="second")) is False
        stored = await get_result(js, "rw-1")
        assert stored is not None and stored.output == "first"
        assert await writer.write_once(Result(id="rw-2", status="ok")) is True
    finally:
        await nc.close()


async def test_a_write_with_no_results_bucket_fails_clearly(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(NoStreamResponseError):
            await ResultWriter(nc).write_once(Result(id="rw-3", status="ok"))
    finally:
        await nc.close()


async def test_a_write_without_a_puback_times_out(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        # Something answers on the subject but never with a PubAck: the write must not hang.
        async def ignore(msg: object) -> None:
            return None

        await nc.subscribe("$KV.results.>", cb=ignore)
        with pytest.raises(nats.errors.TimeoutError):
            await ResultWriter(nc, timeout_s=0.5).write_once(Result(id="rw-4", status="ok"))
    finally:
        await nc.close()
