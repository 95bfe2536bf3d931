"""Shared helpers for the benchmarks: machine description, matmul peak, CPU contention, tables.

Benchmarks print, they never assert a time."""
import json
import os
import platform
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python bench/x.py` from anywhere
# A checkout beside the shared folder finds it; elsewhere (a worktree, a GPU box) SCIFACT_DIR says where.
SCIFACT = os.environ.get("SCIFACT_DIR") or os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "scifact"))


# ---- machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def machine_lines(dtype: torch.dtype | None = None, extra: dict | None = None) -> list[str]:
    import transformers
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    lines = [f"- cpu: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
             f"SIMD: {', '.join(simd) or 'none of avx2/avx512'}",
             f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
             f"- engine dtype: {str(dtype).removeprefix('torch.') if dtype is not None else 'n/a'} (dtype=\"auto\")",
             f"- load average at start: {loadavg():.2f} (the 'other cores' column is CPU used by other processes "
             f"while each row ran; > 0.3 means the row was measured on a shared, busy machine)"]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    return lines


def print_machine(title: str, dtype: torch.dtype | None = None, extra: dict | None = None) -> None:
    print(f"## {title}\n")
    print("\n".join(machine_lines(dtype, extra)))
    print()


# ---- contention -----------------------------------------------------------------------------
def _proc_stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts[:8]), idle


def _self_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of all threads


class Section:
    """Wall time of a block, and how many cores other processes kept busy meanwhile."""

    def __init__(self):
        self.seconds = 0.0
        self.other_cores = float("nan")

    def __enter__(self):
        try:
            self._stat, self._self = _proc_stat(), _self_jiffies()
        except OSError:
            self._stat = None
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t
        if self._stat is not None:
            (t1, i1), s1 = _proc_stat(), _self_jiffies()
            total, idle = t1 - self._stat[0], i1 - self._stat[1]
            ncpu = os.cpu_count() or 1
            if total > 0:
                self.other_cores = max(0.0, (total - idle - (s1 - self._self)) / total * ncpu)
        return False


class Timed:
    """Sums Sections: total seconds, time-weighted other-cores."""

    def __init__(self):
        self.seconds, self._weighted = 0.0, 0.0

    def add(self, s: Section) -> None:
        self.seconds += s.seconds
        self._weighted += s.seconds * s.other_cores

    @property
    def other_cores(self) -> float:
        return self._weighted / self.seconds if self.seconds else float("nan")


# ---- matmul peak ----------------------------------------------------------------------------
def matmul_gflops(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def matmul_peaks(n: int = 2048, slow_limit_s: float = 10.0) -> dict[torch.dtype, tuple[float, int]]:
    """torch.mm GFLOP/s for fp32 and bf16 at n (best of 3). A dtype whose n-sized matmul would take
    longer than slow_limit_s (bf16 without avx512_bf16/AMX: ~100 s at n=2048) is measured at a smaller n."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        probe = matmul_gflops(dtype, 256, repeats=2)
        size = n
        while size > 256 and 2 * size ** 3 / (probe * 1e9) > slow_limit_s:
            size //= 2
        out[dtype] = (matmul_gflops(dtype, size, repeats=3 if size == n else 2), size)
    return out


def peak_lines(peaks: dict[torch.dtype, tuple[float, int]], n: int) -> str:
    parts = []
    for dtype, (g, size) in peaks.items():
        note = "" if size == n else f" at n={size} (n={n} would take minutes on this CPU)"
        parts.append(f"{str(dtype).removeprefix('torch.')} {g:.1f} GFLOP/s{note}")
    return f"torch.mm peak (n={n}, best of 3): " + "; ".join(parts)


# ---- statistics and tables ------------------------------------------------------------------
def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def fmt(x, digits: int = 1) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def ratio(a: float, b: float) -> str:
    if not b or b != b or a != a:
        return "-"
    return f"{a / b:.2f}x"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


# ---- data -----------------------------------------------------------------------------------
def load_scifact(root: str = SCIFACT):
    """corpus {doc_id: "title text"}, queries {qid: text}, test qrels {qid: {doc_id: rel}}."""
    corpus, queries, qrels = {}, {}, {}
    with open(os.path.join(root, "corpus.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            # BEIR / MTEB join title and text with a space.
            corpus[str(d["_id"])] = (d.get("title", "") + " " + d.get("text", "")).strip()
    with open(os.path.join(root, "queries.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            queries[str(d["_id"])] = d["text"]
    with open(os.path.join(root, "qrels", "test.tsv")) as f:
        next(f)
        for line in f:
            qid, did, rel = line.strip().split("\t")
            if int(rel) > 0:
                qrels.setdefault(qid, {})[did] = int(rel)
    return corpus, queries, qrels


@contextmanager
def quiet_transformers():
    """Silence tokenizer length warnings ("sequence length is longer than ...") during timed runs."""
    import logging
    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
