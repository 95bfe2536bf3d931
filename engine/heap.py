"""A serving process's start-up heap moved out of the garbage collector's reach (vLLM freezes its heap too).

A full collection walks every tracked object: after start-up some 500k of them (torch, transformers, the
tokenizer, the model; in a Serve replica Ray, FastAPI and pydantic too), ~230-270 ms on this project's CPU,
and the short-lived outputs of steps and streamed chunks trigger one now and then. Frozen, they are skipped
by every collection; being never collected, they must hold no reference cycle that outlives its use."""
import atexit
import gc

# A young-generation collection every this many net allocations, not Python's 700: a step's outputs die
# young, so collections then (almost) never run mid-decode (CPU, 1,024 DELTA streams: ~1 ms a step -> 0).
YOUNG_GC_THRESHOLD = 10_000


def freeze_heap() -> None:
    """Collects, then freezes everything alive: call once a process has built what it lives with."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


# Frozen objects are not collected even at exit, where extension modules (Triton's) would then report them
# as leaked.
atexit.register(gc.unfreeze)
