"""What a generation's reader has not taken yet (vLLM v1's RequestOutputCollector).

The engine thread puts each step's output; the reader takes them on its event loop. A reader that lags
gets one output, not a backlog: DELTA outputs are merged (RequestOutput.add_delta), the other kinds
replaced by the newest. A reader may also pace itself (`get(not_before)`): a server streaming to HTTP
clients then sends one chunk per interval with the tokens of every step since the last, so a chunk's
fixed cost (a Ray object, an SSE event, its JSON) is paid once per interval, not once per token."""
import asyncio

from engine.outputs import RequestOutput
from engine.params import RequestOutputKind


class OutputCollector:
    __slots__ = ("_merge", "_pending", "_ready")

    def __init__(self, kind: RequestOutputKind):
        self._merge = kind is RequestOutputKind.DELTA
        self._pending: RequestOutput | Exception | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput | Exception) -> None:
        """On the reader's event loop. An error replaces whatever is pending and stays."""
        pending = self._pending
        if isinstance(pending, Exception):
            return
        if self._merge and isinstance(pending, RequestOutput) and isinstance(out, RequestOutput):
            pending.add_delta(out)
        else:
            self._pending = out
        self._ready.set()

    async def get(self, not_before: float = 0.0) -> RequestOutput:
        """Everything put since the last get, as one output. Waits for one, and then, unless it ends
        the request, until the event loop's clock reaches not_before."""
        loop = asyncio.get_running_loop()
        while True:
            out = self._pending
            if out is not None and (isinstance(out, Exception) or out.finished or loop.time() >= not_before):
                self._pending = None
                if isinstance(out, Exception):
                    raise out
                return out
            self._ready.clear()
            wake = None if out is None else loop.call_at(not_before, self._ready.set)
            try:
                await self._ready.wait()
            finally:
                if wake is not None:
                    wake.cancel()
