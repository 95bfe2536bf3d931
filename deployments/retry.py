"""No lost requests: the ingress retries a call whose replica died before the client saw a byte, and
cancels a call whose client went away.

- Retried: every call that fails with RayActorError (the replica actor died, or its node is gone,
  or it is unreachable) before its result (non-streaming) or its first chunk (streaming) arrived.
  Nothing has been sent to the client then, so running it again on another replica is safe. A
  stream that already sent chunks is never re-run: the ingress ends it with an SSE error event.
- Bounded: at most `max_attempts` calls, and retries only within `retry_budget_s` of the first
  failure; a retry must be taken by a replica within that budget. Beyond it: 503 with Retry-After.
- No replica left: Serve's router holds a call until some replica takes it, forever if none is
  running (all died, or none can be placed). A call waits at most `retry_budget_s` while its
  deployment has no replica, then gets 503 with Retry-After.
- Cancelled: a client disconnect (seen on the request's ASGI channel) or the route being cancelled
  cancels the handle call, which cancels the replica's task; the model server's engine call then
  aborts its engine requests (engine.async_engine), freeing their work within one engine step.
"""
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator
from starlette.requests import Request

from deployments.errors import APIError

log = logging.getLogger("ray.serve")
Call = TypeVar("Call", DeploymentResponse, DeploymentResponseGenerator)
POLL_BODY_S = 0.1  # pause between ASGI messages that are not a disconnect
POLL_REPLICAS_S = 0.25  # how often a call waiting for a replica checks that its deployment has any


class RetryPolicy(BaseModel):
    max_attempts: int = Field(3, ge=1)
    retry_budget_s: float = Field(30.0, gt=0)
    backoff_s: float = Field(0.2, ge=0)


async def call_with_retry(start: Callable[[], Call], first: Callable[[Call], Awaitable[Any]], policy: RetryPolicy,
                          what: str, replicas: Callable[[], int | None]) -> tuple[Call, Any]:
    """start() makes the handle call; first(call) awaits what must arrive before the client sees anything
    (the whole result, or a stream's first chunk); replicas() is how many replicas the deployment has
    now (None: unknown). Returns the call and that first result."""
    deadline, attempt = None, 0
    while True:
        call, attempt = start(), attempt + 1
        try:
            await assigned(call, deadline, policy.retry_budget_s, replicas, what)
            return call, await first(call)
        except RayActorError as exc:
            now = time.monotonic()
            deadline = deadline or now + policy.retry_budget_s
            if attempt >= policy.max_attempts or now >= deadline:
                raise APIError(f"{what}: its replicas failed {attempt} time(s), last: {type(exc).__name__}; "
                               f"retry later", 503) from exc
            log.warning("%s: replica failed (%s), retrying on another replica (attempt %d of %d)",
                        what, type(exc).__name__, attempt + 1, policy.max_attempts)
            await asyncio.sleep(policy.backoff_s * attempt)
        except BaseException:  # cancelled (the client left) or failed: the replica drops the call
            call.cancel()
            raise


async def assigned(call: DeploymentResponse | DeploymentResponseGenerator, deadline: float | None,
                   no_replica_s: float, replicas: Callable[[], int | None], what: str) -> None:
    """Wait until a replica took the call. 503 if a retry's deadline passes first, or if the deployment
    has had no replica for no_replica_s."""
    # Serve's own wait for replica assignment; awaiting the call later reuses its cached result.
    assignment = asyncio.ensure_future(call._fetch_future_result_async())
    none_since = None
    try:
        while True:
            wait_s = POLL_REPLICAS_S if deadline is None else min(POLL_REPLICAS_S, deadline - time.monotonic())
            done, _ = await asyncio.wait({assignment}, timeout=max(wait_s, 0.0))
            if done:
                assignment.result()  # raises what the assignment raised (e.g. backpressure)
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise APIError(f"{what}: no replica could take the request; retry later", 503)
            none_since = (none_since or now) if replicas() == 0 else None
            if none_since is not None and now - none_since >= no_replica_s:
                log.warning("%s: no replica has been running for %.0f s; answering 503", what, now - none_since)
                raise APIError(f"{what}: no replica is running (all failed or none could be placed); "
                               f"retry later", 503)
    except BaseException:
        assignment.cancel()
        call.cancel()
        raise


async def until_disconnected(request: Request) -> None:
    """Returns when the HTTP client has disconnected (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(POLL_BODY_S)


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """work's result, or None after cancelling work if the client disconnected first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
        task.cancel()
