"""A Python function as one operator (servecluster::name) that a compiled graph calls without tracing into it.

Defined through torch.library.Library rather than torch.library.custom_op: inside an inductor graph on CPU each
custom_op call cost ~40 us of wrapping (the packed linear product, 121 calls a SmolLM2 decode step: a compiled
bf16 step 23-24 ms with custom_op, 18 ms defined here, AMD EPYC); the schema is inferred from the function's
annotations as custom_op infers it. Ops that take the KV pool's views only read them, so the graph orders them
after the step's writes into those views."""
from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("servecluster", "FRAGMENT")


def opaque_op(name: str, fn: Callable, fake: Callable) -> Callable:
    """fn registered for every device as torch.ops.servecluster.<name>; fake gives its output's shape and dtype
    from its inputs' while a graph is traced. Returns the call: the op inside a compiled graph, fn itself in eager
    steps (no dispatch)."""
    _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"servecluster::{name}", fake, lib=_LIBRARY)
    op = getattr(torch.ops.servecluster, name)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else fn(*args)
    return call
