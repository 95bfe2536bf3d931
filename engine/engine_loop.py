"""Where the engine runs for AsyncLLM: its loop, on a thread of the caller's process or in a process of its own.

The loop applies commands (calls of LLMEngine methods by name, aborts), steps while there is work and
reports events: ("ready", info), ("reply", call id, ok, result or error), ("step", outputs, stats),
("stats", stats) when a batch starts, ("failed", error) when a step raised. Both hosts run the same loop
and report the same events, and AsyncLLM handles them alike.

A process of its own (vLLM v1's engine core process) runs the scheduler, the model and the output
processing on its own interpreter: the server's Python (asyncio, Ray's per-chunk work, HTTP) no longer
takes the GIL from the step that keeps the GPU busy, and streams without stop strings are detokenized by
the caller's process, not this one (engine.stream_text). Events cross a pipe, pickled."""
import logging
import multiprocessing
import pickle
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, PoolingJobOutput, RequestOutput

log = logging.getLogger(__name__)

Event = tuple
Report = Callable[[Event], None]
EngineFactory = Callable[[EngineConfig], LLMEngine]


class EngineLoop:
    def __init__(self, engine: LLMEngine, report: Report):
        self.engine, self.report = engine, report
        engine.on_batch_start = lambda stats: report(("stats", stats))

    def run(self, next_command: Callable[[bool], tuple | None]) -> None:
        """next_command(block) -> a command, or None when there is none and block is False."""
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            while (command := next_command(block)) is not None:
                if command[0] == "shutdown":
                    return
                self._apply(command)
                block = False
            if not engine.has_unfinished():
                self.report(("step", [], engine.stats_snapshot()))  # e.g. after an abort emptied the engine
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug must not leave callers waiting or blocks allocated
                log.exception("engine step failed")
                engine.abort_all()
                self.report(("failed", e))
                continue
            self.report(("step", outputs, engine.stats_snapshot()))

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            return
        _, call_id, method, args = command
        try:
            result = getattr(self.engine, method)(*args)
        except Exception as e:
            self.report(("reply", call_id, False, e))
        else:
            self.report(("reply", call_id, True, result))


def _start(config: EngineConfig, factory: EngineFactory, report: Report,
           built: Callable[[LLMEngine], None] = lambda engine: None) -> EngineLoop | None:
    try:
        engine = factory(config)
    except BaseException as e:
        report(("failed", e))
        return None
    built(engine)
    report(("ready", {"task": engine.task, "max_model_len": engine.max_model_len, "id2label": engine.id2label,
                      "model_dir": engine.model_dir, "input_spec": engine.input_spec, "stats": engine.stats_snapshot()}))
    return EngineLoop(engine, report)


class EngineThread:
    """The loop on a thread of this process; events are reported on that thread. On CPU the model runs on
    the host's cores anyway, and PyTorch releases the GIL inside its kernels."""

    def __init__(self, config: EngineConfig, factory: EngineFactory, on_event: Report):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.engine: LLMEngine | None = None  # for tests and benchmarks that look inside
        # The engine is built on the thread that runs it. On CPU, torch's OpenMP pool belongs to the
        # thread that first runs a parallel op; a model loaded on the caller's thread leaves a second
        # pool, and with more OpenMP threads than cores libgomp stops spinning between ops, so every op
        # of the engine thread sleeps and wakes: decode steps measured 2x slower (README).
        self._thread = threading.Thread(target=self._run, args=(config, factory, on_event), name="engine",
                                        daemon=True)
        self._thread.start()

    def _run(self, config: EngineConfig, factory: EngineFactory, on_event: Report) -> None:
        loop = _start(config, factory, on_event, built=lambda engine: setattr(self, "engine", engine))
        if loop is not None:
            loop.run(self._next_command)

    def _next_command(self, block: bool) -> tuple | None:
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return None

    def send(self, command: tuple) -> None:
        self._inbox.put(command)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._inbox.put(("shutdown",))
        self._thread.join(timeout=10)
        # The engine reports to its caller (on_batch_start), which holds this host: a cycle, and the start-up
        # heap it was built in is frozen (engine.heap), so only dropping the engine here frees it.
        self.engine = None


class EngineProcess:
    """The loop in a spawned process; its events are read by a thread of this one and reported there.
    The process ends when told to or when this one's end of the pipe closes (this process died)."""

    def __init__(self, config: EngineConfig, factory: EngineFactory, on_event: Report):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child = ctx.Pipe()
        self._send_lock = threading.Lock()
        self._process = ctx.Process(target=_process_main, args=(config, factory, child), name="engine", daemon=True)
        self._process.start()
        child.close()
        self._gone = False  # the pipe closed: the process exited or is exiting
        self._reader = threading.Thread(target=self._read, args=(on_event,), name="engine-events", daemon=True)
        self._reader.start()

    def _read(self, on_event: Report) -> None:
        prompts: dict[str, tuple] = {}  # the prompt of every generation running, sent once
        while True:
            try:
                event = self._conn.recv()
            except (EOFError, OSError):
                self._gone = True
                on_event(("failed", RuntimeError("the engine process exited")))
                return
            try:
                if event[0] == "step":
                    event = ("step", _StepCodec.decode(event[1], prompts), event[2])
                elif event[0] == "failed":
                    prompts.clear()
                on_event(event)
            except Exception:  # a bug here would leave every caller waiting: end the engine, fail them all
                log.exception("engine event %r could not be handled", event[0])
                self._gone = True
                self._process.kill()
                on_event(("failed", RuntimeError("the engine process was stopped after an internal error")))
                return

    def send(self, command: tuple) -> None:
        """Raises RuntimeError once the process is gone."""
        try:
            with self._send_lock:
                self._conn.send(command)
        except (OSError, ValueError) as e:  # a closed or broken pipe
            self._gone = True
            raise RuntimeError("the engine process exited") from e

    def alive(self) -> bool:
        return not self._gone and self._process.is_alive()

    def close(self) -> None:
        try:
            self.send(("shutdown",))
        except RuntimeError:
            pass  # already gone
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


class _StepCodec:
    """A step's outputs as plain tuples for the pipe (a pickled slotted dataclass costs several times more),
    each generation's prompt and prompt ids sent with its first output only: they are most of a
    RequestOutput's bytes and the same in every step."""
    __slots__ = ("prompts", "_dropped")

    def __init__(self):
        self.prompts: set[str] = set()  # generations whose prompt the other side has
        self._dropped: list[str] = []  # of those, aborted since the last step: the other side forgets them

    def reset(self) -> None:
        self.prompts.clear()
        self._dropped.clear()

    def aborted(self, request_id: str) -> None:
        if request_id in self.prompts:
            self.prompts.remove(request_id)
            self._dropped.append(request_id)

    def encode(self, outputs: list[RequestOutput | PoolingJobOutput]) -> tuple[list, list[str]]:
        encoded, dropped, self._dropped = [], self._dropped, []
        for out in outputs:
            if not isinstance(out, RequestOutput):
                encoded.append(out)
                continue
            rid = out.request_id
            first = rid not in self.prompts
            if out.finished:
                self.prompts.discard(rid)
            elif first:
                self.prompts.add(rid)
            encoded.append((rid, (out.prompt, out.prompt_token_ids) if first else None, out.finished,
                            out.num_cached_tokens, [(o.index, o.text, o.token_ids, o.cumulative_logprob, o.logprobs,
                                                     o.finish_reason, o.stop_reason) for o in out.outputs]))
        return encoded, dropped

    @staticmethod
    def decode(step: tuple[list, list[str]], prompts: dict[str, tuple]) -> list[RequestOutput | PoolingJobOutput]:
        encoded, dropped = step
        outputs = []
        for item in encoded:
            if not isinstance(item, tuple):
                outputs.append(item)
                continue
            rid, prompt, finished, cached, completions = item
            if prompt is None:
                prompt = prompts.pop(rid) if finished else prompts[rid]
            elif not finished:
                prompts[rid] = prompt
            outputs.append(RequestOutput(rid, prompt[0], prompt[1], [CompletionOutput(*c) for c in completions],
                                         finished, cached))
        for rid in dropped:
            del prompts[rid]
        return outputs


def _process_main(config: EngineConfig, factory: EngineFactory, conn: Connection) -> None:
    codec = _StepCodec()

    def report(event: Event) -> None:
        if event[0] == "step":
            event = ("step", codec.encode(event[1]), event[2])
        elif event[0] == "failed":  # the loop aborted every request
            codec.reset()
        try:
            conn.send(event)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # an error (or result) that cannot cross
            if event[0] == "reply":
                conn.send(("reply", event[1], False, RuntimeError(f"{type(event[3]).__name__}: {event[3]}")))
            elif event[0] == "failed":
                conn.send(("failed", RuntimeError(f"{type(event[1]).__name__}: {event[1]}")))
            else:
                raise RuntimeError(f"engine event {event[0]!r} cannot be sent: {e}") from e

    def next_command(block: bool) -> tuple | None:
        if not block and not conn.poll():
            return None
        try:
            command = conn.recv()
        except EOFError:  # the caller's process is gone
            return ("shutdown",)
        if command[0] == "abort":
            codec.aborted(command[1])
        return command

    loop = _start(config, factory, report, built=_leave_stream_text_to_caller)
    if loop is not None:
        loop.run(next_command)


def _leave_stream_text_to_caller(engine: LLMEngine) -> None:
    """The caller's process detokenizes DELTA streams without stop strings (engine.stream_text)."""
    engine.output_processor.caller_detokenizes = True
