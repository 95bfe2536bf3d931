"""Units of the ingress's retry layer (deployments.retry) on stand-ins for Serve's handle calls: a call
whose replica dies is re-run only within its bounds, and a call no replica can take ends in a 503
instead of waiting forever. The multi-node tests (tests/test_cluster.py) do the same through Ray."""
import asyncio

import pytest
from ray.exceptions import ActorDiedError

from deployments.errors import APIError, to_error
from deployments.retry import RetryPolicy, call_with_retry


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
