"""Background ingestion: parse and chunk in a worker thread, embed in batches, store.

`Ingester` keeps a queue of (vector store, file) pairs. Each worker takes files until it holds
`batch_chunks` chunks (or the queue is empty), embeds them with one call of `embed` (an async
function: texts -> L2-normalized float32 rows; the deployment passes the embedding
deployment's handle), then completes those files together in one SQLite transaction. Files from
many small uploads thus share embedding batches and commits, and several workers keep the
embedder busy.

A file that cannot be parsed fails with its parser's code (unsupported_file / invalid_file);
an embedding error fails the files of that batch with server_error. `recover()` re-queues
everything still in_progress on disk, so ingestion that a dead process left unfinished resumes.
"""
import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np

from rag.parsing import InvalidFile, UnsupportedFile
from rag.store import NotFoundError, VectorStores

logger = logging.getLogger(__name__)

Embed = Callable[[list[str]], Awaitable[np.ndarray]]


class Ingester:
    def __init__(self, stores: VectorStores, embed: Embed, workers: int = 2, batch_chunks: int = 64):
        self.stores, self.embed, self.batch_chunks = stores, embed, batch_chunks
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.queued: set[tuple[str, str]] = set()
        self.tasks = [asyncio.ensure_future(self._work()) for _ in range(workers)]
        self.done = 0

    def submit(self, vs_id: str, file_id: str) -> None:
        if (vs_id, file_id) not in self.queued:
            self.queued.add((vs_id, file_id))
            self.queue.put_nowait((vs_id, file_id))

    def recover(self) -> int:
        pending = self.stores.pending()
        for vs_id, file_id in pending:
            self.submit(vs_id, file_id)
        return len(pending)

    async def idle(self) -> None:
        """Wait until everything submitted so far is ingested (tests, the CLI)."""
        await self.queue.join()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            try:
                prepared = [await self._prepare(*jobs[0])]
                while sum(len(p[2]) for p in prepared if p) < self.batch_chunks and not self.queue.empty():
                    jobs.append(self.queue.get_nowait())
                    prepared.append(await self._prepare(*jobs[-1]))
                await self._embed_and_store([p for p in prepared if p])
            except Exception:  # never let a worker die: the files stay in_progress for recover()
                logger.exception("ingestion worker error")
            finally:
                for job in jobs:
                    self.queued.discard(job)
                    self.queue.task_done()

    async def _prepare(self, vs_id: str, file_id: str) -> tuple[str, str, list[str]] | None:
        try:
            chunks = await asyncio.to_thread(self.stores.prepare, vs_id, file_id)
            return None if chunks is None else (vs_id, file_id, chunks)  # None: cancelled or detached while queued
        except (UnsupportedFile, InvalidFile) as exc:
            self.stores.fail(vs_id, file_id, exc.code, str(exc))
        except NotFoundError:
            pass  # the store or file went away
        except Exception as exc:
            self.stores.fail(vs_id, file_id, "server_error", f"{type(exc).__name__}: {exc}")
        return None

    async def _embed_and_store(self, prepared: list[tuple[str, str, list[str]]]) -> None:
        texts = [t for _, _, chunks in prepared for t in chunks]
        try:
            vectors = [await self.embed(texts[i:i + self.batch_chunks]) for i in range(0, len(texts), self.batch_chunks)]
            vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        except Exception as exc:
            for vs_id, file_id, _ in prepared:
                self.stores.fail(vs_id, file_id, "server_error", f"embedding failed: {type(exc).__name__}: {exc}")
            return
        bounds = np.cumsum([0] + [len(chunks) for _, _, chunks in prepared])
        files = [(vs_id, file_id, chunks, vectors[bounds[i]:bounds[i + 1]])
                 for i, (vs_id, file_id, chunks) in enumerate(prepared)]
        try:
            await asyncio.to_thread(self.stores.complete_many, files)
        except Exception as exc:
            for vs_id, file_id, _ in prepared:
                self.stores.fail(vs_id, file_id, "server_error", f"{type(exc).__name__}: {exc}")
        self.done += len(prepared)
        logger.info("ingested %d files (%d chunks); %d files done, %d queued",
                    len(prepared), len(texts), self.done, self.queue.qsize())
