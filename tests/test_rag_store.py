"""The rag/ library alone: no Ray, no HTTP, a fake embedder (bag of hashed words), the real
MiniLM tokenizer for chunking."""
import asyncio
import io
import threading
import zlib

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.loader import resolve_model
from rag import Ingester, NotFoundError, VectorStores
from rag.attributes import matches, validate_attributes, validate_filter
from rag.chunking import chunk_text, chunking_strategy, max_chunk_tokens
from rag.parsing import InvalidFile, UnsupportedFile, extract_text

DIM = 512


def fake_embed_rows(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), DIM), np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.strip(".,").encode()) % DIM] += 1  # not hash(): seeded per process
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
    return out


async def fake_embed(texts):
    return fake_embed_rows(texts)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("sentence-transformers/all-MiniLM-L6-v2"))


@pytest.fixture
def stores(tmp_path, tokenizer):
    s = VectorStores(str(tmp_path), tokenizer, max_chunk_tokens(tokenizer, 256))
    yield s
    s.close()


def ingest(stores, *pairs):
    async def run():
        ing = Ingester(stores, fake_embed, workers=2, batch_chunks=8)
        for p in pairs:
            ing.submit(*p)
        await ing.idle()
        await ing.close()
    asyncio.run(run())


def test_parsing():
    assert extract_text("a.md", b"# Title\nbody") == "# Title\nbody"
    html = b"<html><head><title>t</title><script>x()</script></head><body><p>One</p><p>Two &amp; three</p></body></html>"
    assert extract_text("a.html", html) == "One\nTwo & three"
    with pytest.raises(UnsupportedFile):
        extract_text("a.exe", b"MZ")
    with pytest.raises(InvalidFile):
        extract_text("a.txt", b"\xff\xfe\xfa")
    with pytest.raises(InvalidFile):
        extract_text("a.pdf", b"not a pdf")


def test_pdf(tmp_path):
    from pypdf import PdfWriter
    w = PdfWriter()
    w.add_blank_page(100, 100)
    buf = io.BytesIO()
    w.write(buf)
    assert extract_text("blank.pdf", buf.getvalue()) == ""


def test_chunking(tokenizer):
    limit = max_chunk_tokens(tokenizer, 256)
    assert limit == 254
    auto = chunking_strategy(None, limit)
    assert (auto.max_chunk_size_tokens, auto.chunk_overlap_tokens) == (254, 127)
    assert chunking_strategy({"type": "auto"}, 4096).max_chunk_size_tokens == 800
    static = chunking_strategy({"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}}, limit)
    text = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(text, tokenizer, static)
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= 100 for c in chunks)
    assert chunks[0].startswith("word0") and chunks[-1].endswith("word299")
    assert len(chunks) > 3 and all(c in text for c in chunks)
    for bad in ({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
                {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}},
                {"type": "static", "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 0}},
                {"type": "weird"}):
        with pytest.raises(ValueError, match="chunking_strategy"):
            chunking_strategy(bad, limit)
    assert chunk_text("   ", tokenizer, auto) == []


def test_attributes_and_filters():
    validate_attributes({f"k{i}": i for i in range(16)})
    for bad in ({f"k{i}": i for i in range(17)}, {"k" * 65: 1}, {"k": "v" * 513}, {"k": [1]}):
        with pytest.raises(ValueError, match="attributes"):
            validate_attributes(bad)
    attrs = {"year": 2021, "lang": "en", "draft": False}
    assert matches({"type": "eq", "key": "lang", "value": "en"}, attrs)
    assert matches({"type": "gte", "key": "year", "value": 2021}, attrs)
    assert not matches({"type": "gt", "key": "year", "value": 2021}, attrs)
    assert not matches({"type": "gt", "key": "lang", "value": 3}, attrs)  # mixed kinds: false, not an error
    assert matches({"type": "in", "key": "lang", "value": ["fr", "en"]}, attrs)
    assert matches({"type": "nin", "key": "lang", "value": ["fr"]}, attrs)
    assert not matches({"type": "eq", "key": "missing", "value": 1}, attrs)
    assert matches({"type": "and", "filters": [{"type": "lt", "key": "year", "value": 2030},
                                               {"type": "or", "filters": [{"type": "eq", "key": "draft", "value": False},
                                                                          {"type": "eq", "key": "lang", "value": "de"}]}]},
                   attrs)
    for bad in ({"type": "like", "key": "a", "value": 1}, {"type": "eq", "value": 1}, {"type": "and", "filters": []},
                {"type": "in", "key": "a", "value": 3}, {"type": "eq", "key": "a"}):
        with pytest.raises(ValueError, match="filters"):
            validate_filter(bad)


def test_store_lifecycle_search_and_filters(stores):
    docs = {"paris.txt": "The Eiffel Tower is in Paris, France.", "fuji.txt": "Mount Fuji is the highest mountain in Japan.",
            "python.md": "Python is a programming language.", "wall.html": "<p>The Great Wall is in China.</p>"}
    files = {name: stores.create_file(name, "assistants", text.encode()) for name, text in docs.items()}
    bad = stores.create_file("image.png", "assistants", b"\x89PNG")
    assert files["paris.txt"]["object"] == "file" and files["paris.txt"]["id"].startswith("file-")
    vs = stores.create_store(name="docs", metadata={"team": "a"})
    assert vs["id"].startswith("vs_") and vs["file_counts"]["total"] == 0 and vs["status"] == "completed"
    years = {"paris.txt": 2020, "fuji.txt": 2021, "python.md": 2022, "wall.html": 2023}
    for name, f in files.items():
        sf = stores.attach_file(vs["id"], f["id"], attributes={"year": years[name], "name": name})
        assert sf["status"] == "in_progress"
    stores.attach_file(vs["id"], bad["id"])
    assert stores.get_store(vs["id"])["status"] == "in_progress"
    ingest(stores, *stores.pending())
    store = stores.get_store(vs["id"])
    assert store["file_counts"] == {"in_progress": 0, "completed": 4, "failed": 1, "cancelled": 0, "total": 5}
    assert store["usage_bytes"] > 0 and store["status"] == "completed"
    failed = stores.get_store_file(vs["id"], bad["id"])
    assert failed["status"] == "failed" and failed["last_error"]["code"] == "unsupported_file"

    q = fake_embed_rows(["Eiffel Tower Paris"])
    hits = stores.search(vs["id"], q, 3)
    assert hits[0]["filename"] == "paris.txt" and hits[0]["attributes"]["year"] == 2020
    assert all(0 <= h["score"] <= 1 for h in hits) and hits[0]["content"][0]["text"] == docs["paris.txt"]
    # the filter applies before the top-k: one result asked, the best *allowed* one comes back
    hits = stores.search(vs["id"], q, 1, filters={"type": "gte", "key": "year", "value": 2022})
    assert len(hits) == 1 and hits[0]["attributes"]["year"] >= 2022
    assert stores.search(vs["id"], q, 5, filters={"type": "eq", "key": "year", "value": 1999}) == []
    assert all(h["score"] >= 0.5 for h in stores.search(vs["id"], q, 5, score_threshold=0.5))
    with pytest.raises(ValueError, match="max_num_results"):
        stores.search(vs["id"], q, 51)
    with pytest.raises(ValueError, match="filters"):
        stores.search(vs["id"], q, 5, filters={"type": "near", "key": "x", "value": 1})

    # listing: pages, order, cursors, status filter
    listed = stores.list_store_files(vs["id"], limit=2, order="asc")
    assert len(listed["data"]) == 2 and listed["has_more"]
    rest = stores.list_store_files(vs["id"], limit=10, order="asc", after=listed["last_id"])
    assert len(rest["data"]) == 3 and not rest["has_more"]
    assert [f["id"] for f in stores.list_store_files(vs["id"], status="failed")["data"]] == [bad["id"]]
    with pytest.raises(NotFoundError):
        stores.get_store_file(vs["id"], "file-nope")

    # update attributes, detach, delete the file: search follows
    stores.update_store_file(vs["id"], files["paris.txt"]["id"], {"year": 1999})
    assert stores.search(vs["id"], q, 1, filters={"type": "eq", "key": "year", "value": 1999})[0]["filename"] == "paris.txt"
    stores.detach_file(vs["id"], files["paris.txt"]["id"])
    assert all(h["filename"] != "paris.txt" for h in stores.search(vs["id"], q, 5))
    stores.delete_file(files["fuji.txt"]["id"])
    assert all(h["filename"] != "fuji.txt" for h in stores.search(vs["id"], q, 5))
    assert stores.get_store(vs["id"])["file_counts"]["total"] == 3
    with pytest.raises(NotFoundError):
        stores.get_file(files["fuji.txt"]["id"])
    assert stores.delete_store(vs["id"])["deleted"]
    with pytest.raises(NotFoundError):
        stores.get_store(vs["id"])


def test_batches_and_cancel(stores):
    ids = [stores.create_file(f"d{i}.txt", "assistants", f"document number {i}".encode())["id"] for i in range(6)]
    vs = stores.create_store(name="b")
    batch = stores.create_batch(vs["id"], file_ids=ids[:3], attributes={"group": "one"})
    assert batch["object"] == "vector_store.files_batch" and batch["status"] == "in_progress"
    assert batch["file_counts"]["in_progress"] == 3
    other = stores.create_batch(vs["id"], files=[{"file_id": i, "attributes": {"n": k}} for k, i in enumerate(ids[3:])])
    cancelled = stores.cancel_batch(vs["id"], other["id"])
    assert cancelled["status"] == "cancelled" and cancelled["file_counts"]["cancelled"] == 3
    ingest(stores, *stores.pending())
    assert stores.get_batch(vs["id"], batch["id"])["status"] == "completed"
    assert len(stores.list_batch_files(vs["id"], batch["id"])["data"]) == 3
    assert stores.get_store(vs["id"])["file_counts"]["cancelled"] == 3
    with pytest.raises(ValueError, match="file_ids"):
        stores.create_batch(vs["id"])
    with pytest.raises(NotFoundError):
        stores.create_batch(vs["id"], file_ids=["file-nope"])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_persistence_and_index_kinds(tmp_path, tokenizer, kind):
    limit = max_chunk_tokens(tokenizer, 256)
    stores = VectorStores(str(tmp_path), tokenizer, limit)
    vs = stores.create_store(name="p", index_kind=kind)
    ids = [stores.create_file(f"d{i}.txt", "assistants", f"topic{i} alpha{i % 7} beta".encode())["id"]
           for i in range(120)]
    stores.create_batch(vs["id"], file_ids=ids, attributes={"k": 1})
    ingest(stores, *stores.pending())
    late = stores.create_file("late.txt", "assistants", b"never ingested")
    stores.attach_file(vs["id"], late["id"])  # left in_progress, as a process that died would leave it
    q = fake_embed_rows(["topic5 alpha5"])
    before = stores.search(vs["id"], q, 5)
    stores.flush()
    assert (tmp_path / "indexes" / vs["id"]).is_dir()
    stores.close()

    again = VectorStores(str(tmp_path), tokenizer, limit)
    assert again.search(vs["id"], q, 5) == before  # loaded from the index file
    assert again.pending() == [(vs["id"], late["id"])]
    ingest(again, *again.pending())
    assert again.get_store(vs["id"])["file_counts"]["completed"] == 121
    filtered = again.search(vs["id"], q, 3, filters={"type": "eq", "key": "k", "value": 1})
    assert filtered[0]["filename"] == "d5.txt"
    again.close()
    for f in (tmp_path / "indexes" / vs["id"]).iterdir():
        f.unlink()  # index files gone: rebuilt from SQLite
    third = VectorStores(str(tmp_path), tokenizer, limit)
    assert third.search(vs["id"], q, 5)[:1] == before[:1]
    third.close()


def test_concurrent_writers_do_not_corrupt(stores):
    vs = stores.create_store(name="c")
    ids = [stores.create_file(f"d{i}.txt", "assistants", f"text {i}".encode())["id"] for i in range(40)]
    for i in ids:
        stores.attach_file(vs["id"], i)
    threads = [threading.Thread(target=lambda part=ids[k::4]: [
        stores.complete(vs["id"], f, [f"text {f}"], fake_embed_rows([f"text {f}"])) for f in part]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores.get_store(vs["id"])["file_counts"]["completed"] == 40
    assert stores.index(vs["id"]).size == 40
    assert not stores.complete(vs["id"], ids[0], ["again"], fake_embed_rows(["again"]))  # no double insert


def test_two_processes_share_one_data_dir(tmp_path, tokenizer):
    """Read replicas: a second VectorStores on the same directory sees what the first one wrote,
    and picks up later writes (the store's version changes, its index reloads)."""
    limit = max_chunk_tokens(tokenizer, 256)
    writer, reader = (VectorStores(str(tmp_path), tokenizer, limit) for _ in range(2))
    vs = writer.create_store(name="shared")
    first = writer.create_file("one.txt", "assistants", b"apples and pears")
    writer.attach_file(vs["id"], first["id"])
    ingest(writer, *writer.pending())
    q = fake_embed_rows(["apples pears"])
    assert [h["filename"] for h in reader.search(vs["id"], q, 5)] == ["one.txt"]
    second = writer.create_file("two.txt", "assistants", b"apples and plums")
    writer.attach_file(vs["id"], second["id"])
    ingest(writer, *writer.pending())
    assert {h["filename"] for h in reader.search(vs["id"], q, 5)} == {"one.txt", "two.txt"}
    writer.detach_file(vs["id"], first["id"])
    assert [h["filename"] for h in reader.search(vs["id"], q, 5)] == ["two.txt"]
    writer.close()
    reader.close()


def test_files_of_one_embedding_batch_complete_together(stores):
    """Ingestion stores a whole embedding batch in one transaction: an empty file among them
    completes with no chunks, a file detached while queued is skipped, the rest are searchable."""
    vs = stores.create_store(name="batch")
    texts = ["red apples", "", "green pears", "blue plums"]
    ids = [stores.create_file(f"d{i}.txt", "assistants", t.encode())["id"] for i, t in enumerate(texts)]
    stores.create_batch(vs["id"], ids)
    prepared = [(vs["id"], f, stores.prepare(vs["id"], f)) for f in ids]
    assert prepared[1][2] == []
    stores.detach_file(vs["id"], ids[3])
    with pytest.raises(NotFoundError):
        stores.prepare(vs["id"], ids[3])
    stored = stores.complete_many([(v, f, c, fake_embed_rows(c)) for v, f, c in prepared])
    assert stored == [True, True, True, False]
    assert [f["status"] for f in stores.list_store_files(vs["id"], order="asc")["data"]] == ["completed"] * 3
    hits = stores.search(vs["id"], fake_embed_rows(["pears"]), 1)
    assert hits[0]["filename"] == "d2.txt"
    assert stores.index(vs["id"]).size == 2
