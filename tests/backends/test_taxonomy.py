"""Every backend, every failure: the right result status and the right JetStream action."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from mesh.contract import Result, Task
from mesh.results import DeadLetter
from mesh.topology import DEAD_STREAM, TASKS_STREAM, Capability, TopologySettings, chunk_subject
from tests.fakes._server import bad_request, blocked, empty, hang, rate_limited, server_error
from tests.helpers import orchestrator_for, poll_until, running_worker

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import ConsumerInfo

    from tests.backends.conftest import Provider

pytestmark = pytest.mark.anyio

ANY_CONSUMER = Capability("chat", "any").consumer


async def test_a_task_succeeds_with_token_accounting(provider: Provider, nats_url: str) -> None:
    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        await orch.submit(Task(id="ok-1", prompt="say hello"))
        result = await orch.wait("ok-1", timeout_s=10)

    assert result is not None
    assert result.status == "ok", result
    assert result.output == "fake answer to say hello"
    assert (result.backend, result.model, result.attempt) == (provider.backend, "fake-model", 1)
    assert result.usage.prompt_tokens == 5 and result.usage.completion_tokens == 5
    assert result.usage.tokens_per_s and result.usage.tokens_per_s > 0
    assert len(provider.fake.calls_for("say hello")) == 1


async def test_rate_limit_with_retry_after_naks_with_that_delay(
    provider: Provider, nats_url: str
) -> None:
    provider.fake.plan("slow down", rate_limited(retry_after_s=1.0))
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(provider.settings(nats_url)) as worker,
    ):
        await orch.submit(Task(id="rl-1", prompt="slow down"))
        await poll_until(lambda: provider.fake.calls_for("slow down"), what="first call")
        # While it waits out the delay, the task is back with JetStream, not held by the worker.
        await poll_until(lambda: worker.in_flight == 0, what="the worker to let go")
        info = await orch.js.consumer_info(TASKS_STREAM, ANY_CONSUMER)
        assert (info.delivered.consumer_seq, info.num_ack_pending) == (1, 1)
        assert len(provider.fake.calls_for("slow down")) == 1
        result = await orch.wait("rl-1", timeout_s=10)
        # JetStream delivered it a second time (num_delivered 2 is the result's attempt).
        settled = await poll_until(lambda: _consumer_settled(orch.js), what="the ack")

    calls = provider.fake.calls_for("slow down")
    assert result is not None
    assert (result.status, result.attempt) == ("ok", 2), result
    assert settled.delivered.consumer_seq == 2
    assert len(calls) == 2
    assert 0.9 <= calls[1].at - calls[0].at < 3.0


async def test_a_rate_limit_pauses_the_worker_not_only_its_task(
    provider: Provider, nats_url: str
) -> None:
    provider.fake.plan("p0", rate_limited(retry_after_s=1.0))
    settings = provider.settings(nats_url, concurrency=1)
    tasks = [Task(id=f"pause-{i}", prompt=f"p{i}") for i in range(4)]
    async with orchestrator_for(nats_url) as orch, running_worker(settings):
        await orch.submit(tasks[0])
        await poll_until(lambda: provider.fake.calls_for("p0"), what="the first call")
        await orch.submit_many(tasks[1:])
        done = [await orch.wait(t.id, timeout_s=15) for t in tasks]

    assert [r.status if r else None for r in done] == ["ok"] * 4, done
    limited_at = provider.fake.calls_for("p0")[0].at
    later = [call.at for call in provider.fake.calls if call.at > limited_at]
    assert len(later) == 4, "each task called once more: p0 again, p1 to p3 once"
    # No call while the limit held: the other tasks waited in JetStream, not at the provider.
    assert min(later) - limited_at >= 0.9, [round(t - limited_at, 2) for t in later]
    assert all(r.attempt == 1 for r in done[1:]), "waiting cost them no delivery"


async def test_streamed_pieces_arrive_in_order_before_the_final_result(
    provider: Provider, nats_url: str
) -> None:
    pieces: list[tuple[int, str]] = []

    async def on_chunk(msg: Msg) -> None:
        pieces.append((int(msg.headers["D8-Chunk-Seq"]), msg.data.decode()))

    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        # Subscribe first: chunks are core NATS messages, not stored.
        await orch.nc.subscribe(chunk_subject("st-1"), cb=on_chunk)
        await orch.nc.flush()
        await orch.submit(Task(id="st-1", prompt="stream me please", stream=True))
        result = await orch.wait("st-1", timeout_s=10)
        assert result is not None
        assert result.status == "ok", result
        await poll_until(lambda: len(pieces) >= result.chunks, what="every chunk")

    assert [seq for seq, _ in pieces] == list(range(1, result.chunks + 1))
    assert result.chunks == 6
    assert (
        "".join(piece for _, piece in pieces) == result.output == "fake answer to stream me please"
    )
    assert result.usage.ttft_ms is not None and result.usage.ttft_ms >= 0
    assert result.usage.completion_tokens == 6
    calls = provider.fake.calls_for("stream me please")
    assert len(calls) == 1 and calls[0].stream


async def test_rate_limit_without_retry_after_backs_off(provider: Provider, nats_url: str) -> None:
    provider.fake.plan("busy", rate_limited())
    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        await orch.submit(Task(id="rl-2", prompt="busy"))
        result = await orch.wait("rl-2", timeout_s=10)

    assert result is not None
    assert (result.status, result.attempt) == ("ok", 2), result
    calls = provider.fake.calls_for("busy")
    assert len(calls) == 2
    # RetryPolicy(base_delay_s=0.2) with 20 % jitter.
    assert 0.15 <= calls[1].at - calls[0].at < 1.5


async def test_a_server_error_is_retried_once_and_then_succeeds(
    provider: Provider, nats_url: str
) -> None:
    provider.fake.plan("flaky", server_error(500))
    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        await orch.submit(Task(id="se-1", prompt="flaky"))
        result = await orch.wait("se-1", timeout_s=10)
        # The ack follows the stored result; wait for JetStream to have it.
        info = await poll_until(
            lambda: _consumer_settled(orch.js), what="the consumer to have no pending task"
        )

    assert result is not None
    assert (result.status, result.attempt) == ("ok", 2), result
    # One call per attempt: the client library did not retry the 500 by itself.
    assert len(provider.fake.calls_for("flaky")) == 2
    assert info.delivered.consumer_seq == 2
    assert info.num_redelivered == 0


async def test_a_hung_provider_times_out_and_the_task_is_retried(
    provider: Provider, nats_url: str
) -> None:
    provider.fake.plan("hang up", hang())
    settings = provider.settings(nats_url, timeout_s=0.5)
    async with orchestrator_for(nats_url) as orch, running_worker(settings):
        await orch.submit(Task(id="to-1", prompt="hang up"))
        result = await orch.wait("to-1", timeout_s=10)

    assert result is not None
    assert (result.status, result.attempt) == ("ok", 2), result
    calls = provider.fake.calls_for("hang up")
    assert len(calls) == 2
    assert calls[1].at - calls[0].at >= 0.5


async def test_bad_credentials_stop_the_worker_and_keep_the_task(
    provider: Provider, nats_url: str
) -> None:
    async with orchestrator_for(nats_url) as orch:
        async with running_worker(provider.settings(nats_url)) as worker:
            provider.revoke_key()
            await orch.submit(Task(id="auth-1", prompt="who am I"))
            await poll_until(lambda: worker.fatal, what="the worker to give up")
        assert "credentials" in str(worker.fatal)
        assert "test-key" not in str(worker.fatal) and "a-different-key" not in str(worker.fatal)

        # The task is still in TASKS, handed back (nak) rather than failed.
        stream = await orch.js.stream_info(TASKS_STREAM)
        info = await orch.js.consumer_info(TASKS_STREAM, ANY_CONSUMER)
        assert stream.state.messages == 1
        assert (info.delivered.consumer_seq, info.num_ack_pending + info.num_pending) == (1, 1)
        assert await orch.result("auth-1") is None

        # Another worker with a good key takes it.
        provider.restore_key()
        async with running_worker(provider.settings(nats_url)):
            result = await orch.wait("auth-1", timeout_s=10)

    assert result is not None
    assert (result.status, result.attempt) == ("ok", 2), result
    assert len(provider.fake.calls_for("who am I")) == 2


async def test_an_unknown_model_stops_the_worker_and_keeps_the_task(
    provider: Provider, nats_url: str
) -> None:
    async with orchestrator_for(nats_url) as orch:
        async with running_worker(provider.settings(nats_url)) as worker:
            provider.fake.models.clear()
            await orch.submit(Task(id="model-1", prompt="which model"))
            await poll_until(lambda: worker.fatal, what="the worker to give up")
        stream = await orch.js.stream_info(TASKS_STREAM)

    assert "fake-model" in str(worker.fatal) and "404" in str(worker.fatal)
    assert stream.state.messages == 1
    assert len(provider.fake.calls_for("which model")) == 1


async def test_an_invalid_request_is_an_error_result_and_a_dead_letter(
    provider: Provider, nats_url: str
) -> None:
    provider.fake.plan("too long", bad_request())
    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        await orch.submit(Task(id="bad-1", prompt="too long"))
        result = await orch.wait("bad-1", timeout_s=10)
        await _assert_dead_lettered(orch.js, "bad-1", "invalid_task")

    assert result is not None
    assert result.status == "error", result
    assert result.error is not None and result.error.type == "invalid_task"
    assert "400" in result.error.message
    assert len(provider.fake.calls_for("too long")) == 1


async def test_a_blocked_answer_is_an_error_result_with_the_reason(
    cloud_provider: Provider, nats_url: str
) -> None:
    provider = cloud_provider
    provider.fake.plan("something nasty", blocked())
    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        await orch.submit(Task(id="blk-1", prompt="something nasty"))
        result = await orch.wait("blk-1", timeout_s=10)
        await _assert_dead_lettered(orch.js, "blk-1", "blocked")

    assert result is not None
    assert result.status == "error", result
    assert result.error is not None and result.error.type == "blocked"
    reason = "SAFETY" if provider.backend == "gemini" else "content_filter"
    assert reason in result.error.message
    assert len(provider.fake.calls_for("something nasty")) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_empty_answer_is_reported_not_retried(
    provider: Provider, nats_url: str, stream: bool
) -> None:
    provider.fake.plan("say nothing", empty())
    async with orchestrator_for(nats_url) as orch, running_worker(provider.settings(nats_url)):
        await orch.submit(Task(id="empty-1", prompt="say nothing", stream=stream))
        result = await orch.wait("empty-1", timeout_s=10)

    assert result is not None
    if provider.backend == "ollama":
        # Ollama has no candidates or choices: an empty message is the model's answer.
        assert (result.status, result.output, result.chunks) == ("ok", "", 0)
    else:
        assert result.status == "error" and result.error is not None
        assert result.error.type == "empty_answer"
    assert len(provider.fake.calls_for("say nothing")) == 1


async def test_an_id_reused_after_the_window_is_answered_from_the_store(
    provider: Provider, nats_url: str
) -> None:
    # The second call would hang for a minute: only the stored result can end it in time.
    provider.fake.plan("SECOND", hang())
    topology = TopologySettings(heartbeat_interval_s=1.0, duplicate_window_s=1.0)
    settings = provider.settings(nats_url, timeout_s=60, topology=topology)
    async with (
        orchestrator_for(nats_url, topology=topology) as orch,
        running_worker(settings) as worker,
    ):
        _, first = await orch.run([Task(id="reuse-1", prompt="FIRST")], timeout_s=10)

        async def run_anew() -> Result | None:
            # Within the window the submit is dropped as a duplicate: harmless to repeat.
            submitted, results = await orch.run([Task(id="reuse-1", prompt="SECOND")], 5)
            return None if submitted[0].duplicate else results.get("reuse-1")

        again = await poll_until(run_anew, timeout_s=20, interval_s=0.2, what="a run anew")
        await poll_until(lambda: worker.in_flight == 0, what="the worker to let go")
        await poll_until(lambda: _messages_are(orch.js, TASKS_STREAM, 0), what="the ack")

    assert again == first["reuse-1"]
    assert provider.fake.calls_for("SECOND") == [], "no call is made for a stored result"


async def _assert_dead_lettered(js: JetStreamContext, task_id: str, error_type: str) -> None:
    """The task left TASKS (term) and one copy sits in DEAD with the reason in its headers."""
    await poll_until(lambda: _messages(js, DEAD_STREAM), what="a dead letter")
    dead = await js.get_msg(DEAD_STREAM, 1)
    assert dead.headers is not None
    assert dead.headers[DeadLetter.TASK_ID] == task_id
    assert dead.headers[DeadLetter.ERROR_TYPE] == error_type
    # The term follows the result and the dead letter; wait for JetStream to apply it.
    await poll_until(lambda: _messages_are(js, TASKS_STREAM, 0), what="the task to leave TASKS")


async def _messages_are(js: JetStreamContext, stream: str, count: int) -> bool:
    return await _messages(js, stream) == count


async def _messages(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _consumer_settled(js: JetStreamContext) -> ConsumerInfo | None:
    info = await js.consumer_info(TASKS_STREAM, ANY_CONSUMER)
    return info if info.num_ack_pending == 0 and info.num_pending == 0 else None
