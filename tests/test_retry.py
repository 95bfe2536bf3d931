"""Units of the ingress's retry layer (deployments.retry) on stand-ins for Serve's handle calls: a call
whose replica dies is re-run only within its bounds, and a call no replica can take ends in a 503
instead of waiting forever, and a client that leaves a stream cancels the deployment's stream. The
multi-node tests (tests/test_cluster.py) do the same through Ray."""
import asyncio

import pytest
from ray.exceptions import ActorDiedError
from starlette.requests import ClientDisconnect

from deployments.errors import APIError, to_error
from deployments.retry import RetryPolicy, call_with_retry
from deployments.sse import EventStream, data_events


class Call:
    """A handle call: assigned to a replica when `assignment` resolves; then its result, or the
    replica's death."""

    def __init__(self, dies: bool = False):
        self.assignment = asyncio.get_running_loop().create_future()
        self.dies, self.cancelled = dies, False

    async def _fetch_future_result_async(self):
        return await asyncio.shield(self.assignment)

    def cancel(self) -> None:
        self.cancelled = True

    async def result(self) -> str:
        await self._fetch_future_result_async()
        if self.dies:
            raise ActorDiedError()
        return "answer"


def run(calls: list[Call | None], policy: RetryPolicy, replicas=lambda: 1, what: str = "chat on m"):
    """call_with_retry over the given calls (None: a call that a replica takes at once and answers)."""
    async def main():
        made = []

        def start() -> Call:
            spec = calls[len(made)]
            call = spec(made) if callable(spec) else Call()
            if not callable(spec):
                call.assignment.set_result(None)
            made.append(call)
            return call
        try:
            _, answer = await call_with_retry(start, lambda c: c.result(), policy, what, replicas)
            return answer, made
        except APIError as exc:
            return exc, made
    return asyncio.run(main())


def dying(made: list) -> Call:
    call = Call(dies=True)
    call.assignment.set_result(None)
    return call


def test_a_call_whose_replica_died_runs_again():
    answer, made = run([dying, None], RetryPolicy(max_attempts=3, backoff_s=0))
    assert answer == "answer" and len(made) == 2


def test_without_retries_a_dead_replica_is_a_503_with_retry_after():
    error, made = run([dying, None], RetryPolicy(max_attempts=1, backoff_s=0))
    assert isinstance(error, APIError) and error.status == 503 and len(made) == 1
    body, headers = to_error(error)
    assert "ActorDiedError" in body.error.message and headers["Retry-After"] == "1"


def test_retries_are_bounded_in_count():
    error, made = run([dying] * 3, RetryPolicy(max_attempts=3, backoff_s=0))
    assert isinstance(error, APIError) and error.status == 503 and len(made) == 3


def never_assigned(made: list) -> Call:
    return Call()


def test_no_replica_left_is_a_503_not_a_wait_forever():
    error, made = run([never_assigned], RetryPolicy(retry_budget_s=0.5), replicas=lambda: 0)
    assert isinstance(error, APIError) and error.status == 503 and "no replica is running" in error.message
    assert made[0].cancelled  # Serve's router stops holding it
    assert to_error(error)[1]["Retry-After"] == "1"


def test_a_retry_that_no_replica_takes_is_a_503():
    error, made = run([dying, never_assigned], RetryPolicy(retry_budget_s=0.5, backoff_s=0), replicas=lambda: 1)
    assert isinstance(error, APIError) and error.status == 503 and "no replica could take" in error.message
    assert made[1].cancelled


def test_busy_replicas_keep_a_first_call_waiting():
    """Replicas exist but are full: a first call waits its turn in Serve's queue, beyond the budget."""
    def taken_later(made: list) -> Call:
        call = Call()
        asyncio.get_running_loop().call_later(0.8, call.assignment.set_result, None)
        return call
    answer, made = run([taken_later], RetryPolicy(retry_budget_s=0.05), replicas=lambda: 2)
    assert answer == "answer" and not made[0].cancelled


def replacement_after(polls: int):
    """A replica count: none for the first `polls` checks (all died), then a replacement is running."""
    seen = []
    return lambda: (seen.append(1) or 0) if len(seen) < polls else 1


@pytest.mark.parametrize("replicas", [lambda: None, replacement_after(1)], ids=["unknown", "replaced"])
def test_a_replacement_replica_takes_the_call(replicas):
    """No 503 while the count is unknown (no router of ours), or once a replacement runs again."""
    def taken_later(made: list) -> Call:
        call = Call()
        asyncio.get_running_loop().call_later(0.8, call.assignment.set_result, None)
        return call
    answer, made = run([taken_later], RetryPolicy(retry_budget_s=0.5), replicas=replicas)
    assert answer == "answer" and not made[0].cancelled


# ---- a client that leaves a stream --------------------------------------------------------------
class Stream:
    """A deployment stream: `chunks` chunks at once, then (if `more`) waits forever for the next."""

    def __init__(self, chunks: int, more: bool):
        self.chunks, self.more, self.cancelled = chunks, more, False

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        for i in range(self.chunks):
            yield {"n": i}
        if self.more:
            await asyncio.Event().wait()


def relay(upstream: Stream, leaves: str, asgi: str = "2.0") -> list[bytes]:
    """Serve an EventStream of upstream; the client leaves `while-sending` a chunk (its send never
    completes), `while-waiting` for the next chunk, or `never`. Returns the bodies sent."""
    sent, first_body = [], asyncio.Event()

    async def send(message):
        if message["type"] == "http.response.body":
            if leaves == "while-sending" and sent:
                if asgi == "2.4":
                    raise OSError("connection reset")
                await asyncio.Event().wait()
            sent.append(message["body"])
            first_body.set()

    async def receive():
        if leaves == "never":
            await asyncio.Event().wait()
        await first_body.wait()
        return {"type": "http.disconnect"}

    async def main():
        response = EventStream(data_events(None, upstream), upstream)
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": asgi}}, receive, send), 10)

    try:
        asyncio.run(main())
    except ClientDisconnect:
        pass
    return sent


@pytest.mark.parametrize("leaves,asgi", [("while-sending", "2.0"), ("while-sending", "2.4"), ("while-waiting", "2.0")])
def test_a_client_that_leaves_mid_stream_cancels_the_deployment_stream(leaves, asgi):
    upstream = Stream(chunks=3 if leaves == "while-sending" else 1, more=True)
    sent = relay(upstream, leaves, asgi)
    assert upstream.cancelled and sent[0] == b'data: {"n": 0}\n\n'


def test_a_stream_that_ends_is_not_cancelled():
    upstream = Stream(chunks=2, more=False)
    assert relay(upstream, "never") == [b'data: {"n": 0}\n\n', b'data: {"n": 1}\n\n', b"data: [DONE]\n\n", b""]
    assert not upstream.cancelled
