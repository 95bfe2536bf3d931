"""Vector stores behind OpenAI's Files / Vector Stores API: file parsing, token chunking, FAISS
indexes and SQLite metadata on disk, attribute filters, search, background ingestion. No Ray and
no HTTP: deployments/rag.py serves it, tests/test_rag_store.py tests it alone."""
from rag.ingest import Ingester
from rag.responses import StoredResponses
from rag.store import NotFoundError, VectorStores

__all__ = ["Ingester", "NotFoundError", "StoredResponses", "VectorStores"]
