"""What a generation's reader has not taken yet (vLLM v1's RequestOutputCollector).

The engine thread puts each step's output; the reader takes them on its event loop. A reader that lags
gets one output, not a backlog: DELTA outputs are merged (RequestOutput.add_delta), the other kinds
replaced by the newest. A reader may also pace itself (`get(not_before)`): a server streaming to HTTP
clients then sends one chunk per interval with the tokens of every step since the last, so a chunk's
fixed cost (a Ray object, an SSE event, its JSON) is paid once per interval, not once per token, and
the reader is woken once per interval, not once per step.

A waiting reader is one bare future, resolved by the put (or its pacing timer) that can wake it: with a thousand streams the
readers' wake-ups are a large share of a step's host time, and an asyncio.Event costs several times more
(its waiter list, a clear and a set per output)."""
import asyncio

from engine.outputs import RequestOutput
from engine.params import RequestOutputKind


class OutputCollector:
    __slots__ = ("_merge", "_pending", "_waiter", "_due")

    def __init__(self, kind: RequestOutputKind):
        self._merge = kind is RequestOutputKind.DELTA
        self._pending: RequestOutput | Exception | None = None
        self._waiter: asyncio.Future | None = None  # the waiting reader's
        self._due = True  # the waiting reader's time has come: what is put may be taken

    def put(self, out: RequestOutput | Exception) -> None:
        """On the reader's event loop. An error replaces whatever is pending and stays. The reader is
        woken only when it can take what is pending: an error, the last output, or any output once its
        time has come."""
        pending = self._pending
        if isinstance(pending, Exception):
            return
        if self._merge and isinstance(pending, RequestOutput) and isinstance(out, RequestOutput):
            pending.add_delta(out)
        else:
            self._pending = out
        waiter = self._waiter
        if waiter is not None and (self._due or isinstance(out, Exception) or out.finished):
            _wake(waiter)

    async def get(self, not_before: float = 0.0) -> RequestOutput:
        """Everything put since the last get, as one output. Waits for one, and then, unless it ends
        the request, until the event loop's clock reaches not_before.

        The clock is read once, then the loop's own timer says when not_before has come: uvloop (Ray Serve's
        loop) keeps whole milliseconds, fires a timer a hair before a not_before with float noise and may
        tick between two reads, and a second comparison could leave a reader with tokens pending and no
        timer until its request ended (streams stalled 0.7-3.0 s through Serve)."""
        loop = asyncio.get_running_loop()
        self._due = loop.time() >= not_before
        timer = None if self._due else loop.call_at(not_before, self._come_due)
        try:
            while True:
                out = self._pending
                if out is not None and (self._due or isinstance(out, Exception) or out.finished):
                    self._pending = None
                    if isinstance(out, Exception):
                        raise out
                    return out
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            if timer is not None:
                timer.cancel()

    def _come_due(self) -> None:
        self._due = True
        if self._pending is not None and self._waiter is not None:
            _wake(self._waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
