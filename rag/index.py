"""One FAISS index per vector store, over L2-normalized embeddings (inner product = cosine),
keyed by chunk id (IndexIDMap2, so vectors can be reconstructed for filtered search).

Kinds, chosen per store: `flat` (exact; the default), `ivf` (IndexIVFFlat, nlist ~ sqrt(n),
trained when built) and `hnsw` (IndexHNSWFlat, M=32) for large corpora. A filtered search on
`flat` uses FAISS's ID selector, so the filter applies before the top-k; on `ivf`/`hnsw` an
approximate search with a restrictive filter can miss matches, so a filtered search there is
exact over the allowed chunks' vectors instead.

The index is derived data: SQLite holds every chunk's vector, so a missing or stale index file
is rebuilt from it. Files are written atomically (temp file + os.replace).
"""
import os
import tempfile

import faiss
import numpy as np

KINDS = ("flat", "ivf", "hnsw")
HNSW_M = 32
IVF_NPROBE = 16


class VectorIndex:
    def __init__(self, kind: str, dim: int, inner: faiss.Index | None = None):
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.dim = kind, dim
        self.index = inner if inner is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @classmethod
    def build(cls, kind: str, dim: int, ids: np.ndarray, vectors: np.ndarray) -> "VectorIndex":
        """A fresh index over these vectors (IVF is trained on them)."""
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivf" and len(ids) >= 2:
            nlist = max(1, min(int(np.sqrt(len(ids))), len(ids) // 39 or 1))
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(vectors)
            inner.nprobe = min(IVF_NPROBE, nlist)
            inner.make_direct_map()
        else:  # flat, or an ivf store too small to train: exact until its next rebuild
            inner = faiss.IndexFlatIP(dim)
        index = cls(kind, dim, faiss.IndexIDMap2(inner))
        index.add(ids, vectors)
        return index

    @property
    def size(self) -> int:
        return self.index.ntotal

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, chunk ids) of the k best per query row, best first; `allowed` restricts the
        candidates to those chunk ids before the top-k. Missing slots are dropped."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        if allowed is None:
            scores, ids = self.index.search(query, min(k, self.size))
        elif isinstance(faiss.downcast_index(self.index.index), faiss.IndexFlat):
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            scores, ids = self.index.search(query, min(k, len(allowed)), params=faiss.SearchParameters(sel=sel))
        else:
            vectors = np.stack([self.index.reconstruct(int(i)) for i in allowed])
            sims = query @ vectors.T
            top = np.argsort(-sims, axis=1)[:, :k]
            scores, ids = np.take_along_axis(sims, top, axis=1), allowed[top]
        return scores, ids

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, kind: str, dim: int, path: str) -> "VectorIndex":
        return cls(kind, dim, faiss.read_index(path))
