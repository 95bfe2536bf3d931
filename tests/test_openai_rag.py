"""OpenAI Files / Vector Stores / Responses file_search on Serve, driven by the real `openai`
SDK (and httpx for raw shapes): one Ray start for the module, bundled models, small limits.
The last two tests kill the vector-store replica mid-ingestion, restart the app with two
vector-store replicas, and search through both."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.builder import AppArgs, build_app
from cluster.local_cluster import free_port
from tests.test_serve import EMBED, EMBED_LEN, GEN, error_of, small

RAG_CHAT = "rag-chat"
RERANK = "minilm-scorer"  # a bi-encoder served for scoring: a cheap stand-in for a cross-encoder
MAX_FILE_BYTES = 64 << 10
DOCS = {
    "eiffel.txt": ("The Eiffel Tower is a wrought-iron tower in Paris, France, finished in 1889.", {"year": 1889, "topic": "paris"}),
    "fuji.md": ("# Mount Fuji\nMount Fuji is the highest mountain in Japan, an active volcano.", {"year": 1707, "topic": "japan"}),
    "python.html": ("<html><body><h1>Python</h1><p>Python is a programming language created by Guido van Rossum.</p>"
                    "<script>ignored()</script></body></html>", {"year": 1991, "topic": "code"}),
    "louvre.txt": ("The Louvre in Paris is the world's most-visited art museum.", {"year": 1793, "topic": "paris"}),
}


def app_args(data_dir: str, rag_replicas: int = 1) -> AppArgs:
    return AppArgs(
        models=[small(EMBED, "embed", cpus=0.4, max_len=EMBED_LEN), small(GEN, "generate", cpus=0.4),
                small(EMBED, "score", RERANK, cpus=0.2, max_len=EMBED_LEN)],
        ingress_deployment_config={"ray_actor_options": {"num_cpus": 0.05}},
        rag={"embed_model": EMBED, "rerank_model": RERANK, "generate_model": GEN, "data_dir": data_dir,
             "max_file_bytes": MAX_FILE_BYTES, "embed_batch_size": 4, "ingest_workers": 1,
             "chat_model": RAG_CHAT, "chat_vector_stores": ["docs"],
             "deployment_config": {"ray_actor_options": {"num_cpus": 0.05}, "num_replicas": rag_replicas}})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("rag"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another session's cluster
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(app_args(data_dir)), name="default", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}", data_dir
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0], timeout=300, headers={"OpenAI-Beta": "assistants=v2"}) as c:
        yield c


@pytest.fixture(scope="module")
def store(client):
    """The `docs` store with DOCS ingested through upload_and_poll / file_batches.upload_and_poll."""
    vs = client.vector_stores.create(name="docs", metadata={"owner": "tests"})
    first, *rest = DOCS.items()
    sf = client.vector_stores.files.upload_and_poll(vector_store_id=vs.id, file=(first[0], first[1][0].encode()))
    assert sf.status == "completed" and sf.last_error is None
    client.vector_stores.files.update(sf.id, vector_store_id=vs.id, attributes=first[1][1])
    ids = [client.files.create(file=(name, text.encode()), purpose="assistants").id for name, (text, _) in rest]
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, files=[{"file_id": i, "attributes": attrs} for i, (_, (_, attrs)) in zip(ids, rest)])
    assert batch.status == "completed" and batch.file_counts.completed == len(rest)
    return vs


def test_files(client, http):
    f = client.files.create(file=("notes.txt", b"hello files"), purpose="assistants")
    assert f.object == "file" and f.id.startswith("file-") and f.bytes == 11 and f.filename == "notes.txt"
    assert f.status == "processed" and f.purpose == "assistants"
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).content == b"hello files"
    assert client.files.delete(f.id).deleted
    error_of(http.get(f"/v1/files/{f.id}"), 404)
    error_of(http.delete("/v1/files/file-nope"), 404)
    error_of(http.post("/v1/files", files={"file": ("big.txt", b"x" * (MAX_FILE_BYTES + 1))},
                       data={"purpose": "assistants"}), 413)
    error_of(http.post("/v1/files", files={"file": ("a.txt", b"x")}, data={"purpose": "nonsense"}), 400)
    error_of(http.post("/v1/files", files={"file": ("a.txt", b"x")}), 400)  # purpose missing


def test_vector_store_objects_and_listing(client, http, store):
    vs = client.vector_stores.retrieve(store.id)
    assert vs.object == "vector_store" and vs.id.startswith("vs_") and vs.status == "completed"
    assert vs.file_counts.completed == len(DOCS) and vs.file_counts.total == len(DOCS) and vs.usage_bytes > 0
    assert vs.metadata == {"owner": "tests"}
    raw = http.get(f"/v1/vector_stores/{store.id}").json()
    assert set(raw) >= {"id", "object", "created_at", "name", "usage_bytes", "file_counts", "status", "expires_after",
                        "expires_at", "last_active_at", "metadata"}
    others = [client.vector_stores.create(name=f"extra{i}") for i in range(3)]
    page = client.vector_stores.list(limit=2, order="asc")
    assert len(page.data) == 2 and page.has_more
    names = [v.name for v in client.vector_stores.list(limit=100, order="asc")]
    assert names[-3:] == ["extra0", "extra1", "extra2"]
    after = client.vector_stores.list(limit=100, order="asc", after=others[0].id).data
    assert [v.id for v in after] == [others[1].id, others[2].id]
    assert client.vector_stores.update(others[0].id, name="renamed").name == "renamed"
    for v in others:
        assert client.vector_stores.delete(v.id).deleted
    error_of(http.get(f"/v1/vector_stores/{others[0].id}"), 404)
    files = client.vector_stores.files.list(vector_store_id=store.id, filter="completed", limit=100)
    assert len(files.data) == len(DOCS) and all(f.object == "vector_store.file" for f in files.data)
    f = files.data[0]
    assert f.chunking_strategy.type == "static" and f.chunking_strategy.static.max_chunk_size_tokens == EMBED_LEN - 2  # auto, capped by the embedder
    content = client.vector_stores.files.content(f.id, vector_store_id=store.id)
    assert "".join(c.text for c in content)
    error_of(http.get(f"/v1/vector_stores/{store.id}/files?filter=bogus"), 400)


def test_search_with_filters(client, http, store):
    page = client.vector_stores.search(store.id, query="Which tower is in Paris?", max_num_results=2)
    hits = page.data
    assert hits[0].filename == "eiffel.txt" and hits[0].attributes["year"] == 1889
    assert all(0 <= h.score <= 1 for h in hits) and hits[0].content[0].type == "text"
    # filters apply before the top-k: the best match is excluded, the best allowed one comes back
    hits = client.vector_stores.search(store.id, query="Which tower is in Paris?", max_num_results=1,
                                       filters={"type": "eq", "key": "topic", "value": "code"}).data
    assert [h.filename for h in hits] == ["python.html"]
    hits = client.vector_stores.search(store.id, query="Paris", max_num_results=10, filters={
        "type": "and", "filters": [{"type": "eq", "key": "topic", "value": "paris"},
                                   {"type": "gt", "key": "year", "value": 1800}]}).data
    assert [h.filename for h in hits] == ["eiffel.txt"]
    raw = http.post(f"/v1/vector_stores/{store.id}/search", json={"query": ["louvre museum", "art"],
                                                                 "ranking_options": {"ranker": "none"}}).json()
    assert raw["object"] == "vector_store.search_results.page" and raw["search_query"] == ["louvre museum", "art"]
    assert raw["data"][0]["filename"] == "louvre.txt" and raw["has_more"] is False
    reranked = http.post(f"/v1/vector_stores/{store.id}/search", json={
        "query": "museum", "max_num_results": 2, "ranking_options": {"ranker": RERANK}}).json()["data"]
    assert len(reranked) == 2 and all(0 <= h["score"] <= 1 for h in reranked)
    error_of(http.post(f"/v1/vector_stores/{store.id}/search", json={"query": "x", "filters": {"type": "like"}}), 400)
    error_of(http.post(f"/v1/vector_stores/{store.id}/search", json={"query": "x", "max_num_results": 51}), 400)
    error_of(http.post(f"/v1/vector_stores/{store.id}/search",
                       json={"query": "x", "ranking_options": {"ranker": "gpt-ranker"}}), 400)
    error_of(http.post("/v1/vector_stores/vs_nope/search", json={"query": "x"}), 404)


def test_bad_inputs_and_unsupported_file(client, http, store):
    bad = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("blob.bin", b"\x00\x01"))
    assert bad.status == "failed" and bad.last_error.code == "unsupported_file"
    failed = client.vector_stores.files.list(vector_store_id=store.id, filter="failed").data
    assert [f.id for f in failed] == [bad.id]
    assert client.vector_stores.files.delete(bad.id, vector_store_id=store.id).deleted
    client.files.delete(bad.id)
    error_of(http.post(f"/v1/vector_stores/{store.id}/files", json={"file_id": "file-nope"}), 404)
    error_of(http.get(f"/v1/vector_stores/{store.id}/files/file-nope"), 404)
    error_of(http.get("/v1/vector_stores/vs_nope/files"), 404)
    f = client.files.create(file=("x.txt", b"x"), purpose="assistants")
    error_of(http.post(f"/v1/vector_stores/{store.id}/files",
                       json={"file_id": f.id, "attributes": {f"k{i}": i for i in range(17)}}), 400)
    error_of(http.post(f"/v1/vector_stores/{store.id}/files", json={"file_id": f.id, "chunking_strategy": {
        "type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150}}}), 400)
    error_of(http.post(f"/v1/vector_stores/{store.id}/file_batches", json={}), 400)
    error_of(http.get(f"/v1/vector_stores/{store.id}/file_batches/vsfb_nope"), 404)
    client.files.delete(f.id)


def test_responses_file_search(client, store):
    tool = {"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 2}
    resp = client.responses.create(model=GEN, input="Where is the Eiffel Tower?", tools=[tool],
                                   include=["file_search_call.results"], max_output_tokens=24, temperature=0)
    call, message = resp.output
    assert call.type == "file_search_call" and call.status == "completed" and call.queries == ["Where is the Eiffel Tower?"]
    assert call.results[0].filename == "eiffel.txt" and 0 <= call.results[0].score <= 1
    assert message.type == "message" and message.role == "assistant"
    text = message.content[0]
    assert text.type == "output_text" and text.text and resp.output_text == text.text
    assert text.annotations and all(a.type == "file_citation" for a in text.annotations)
    assert "eiffel.txt" in {a.filename for a in text.annotations}
    assert resp.usage.output_tokens > 0 and resp.status in ("completed", "incomplete")
    without = client.responses.create(model=GEN, input="Where is the Eiffel Tower?", tools=[tool], max_output_tokens=4)
    assert without.output[0].results is None  # results only with include


def test_responses_streaming(client, store):
    tool = {"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 2,
            "filters": {"type": "eq", "key": "topic", "value": "japan"}}
    events = list(client.responses.create(model=GEN, input="How high is Mount Fuji?", tools=[tool],
                                          max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    order = ["response.created", "response.in_progress", "response.output_item.added",
             "response.file_search_call.in_progress", "response.file_search_call.searching",
             "response.file_search_call.completed", "response.output_item.done", "response.content_part.added",
             "response.output_text.delta", "response.output_text.done", "response.output_text.annotation.added",
             "response.content_part.done"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == deltas
    assert {a.filename for a in final.output[1].content[0].annotations} == {"fuji.md"}


def test_responses_errors(http, store):
    tool = {"type": "file_search", "vector_store_ids": ["vs_nope"]}
    error_of(http.post("/v1/responses", json={"model": GEN, "input": "x", "tools": [tool]}), 404)
    error_of(http.post("/v1/responses", json={"model": GEN, "input": "x", "tools": [tool], "stream": True}), 404)
    error_of(http.post("/v1/responses", json={"model": "other", "input": "x"}), 404)
    error_of(http.post("/v1/responses", json={"model": GEN, "input": "x", "tools": [{"type": "web_search"}]}), 400)
    error_of(http.post("/v1/responses", json={"model": GEN, "input": "x", "tools": [
        {"type": "file_search", "vector_store_ids": [store.id], "filters": {"type": "eq"}}]}), 400)


def test_stored_responses_and_previous_response_id(client, http, store):
    tool = {"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 1}
    first = client.responses.create(model=GEN, input="Where is the Eiffel Tower?", tools=[tool], max_output_tokens=6,
                                    temperature=0)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.previous_response_id is None
    question = "When was it finished?"
    alone = client.responses.create(model=GEN, input=question, max_output_tokens=2, store=False)
    follow = client.responses.create(model=GEN, input=question, previous_response_id=first.id, max_output_tokens=2)
    assert follow.previous_response_id == first.id
    # the first turn (its question and its answer) is in the prompt of the follow-up
    assert follow.usage.input_tokens > alone.usage.input_tokens + 8
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store=False keeps nothing
    events = list(client.responses.create(model=GEN, input="And the Louvre?", previous_response_id=follow.id,
                                          max_output_tokens=2, stream=True))
    streamed = events[-1].response
    assert streamed.previous_response_id == follow.id
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    client.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)
    error_of(http.delete(f"/v1/responses/{follow.id}"), 404)
    for stream in (False, True):
        err = error_of(http.post("/v1/responses", json={"model": GEN, "input": "x", "stream": stream,
                                                        "previous_response_id": "resp_nope"}), 404)
        assert "resp_nope" in err["message"] and err["param"] == "previous_response_id"
    assert "resp_nope" in error_of(http.get("/v1/responses/resp_nope"), 404)["message"]


def test_chat_completions_path(client, http, store):
    resp = http.post("/v1/chat/completions", json={"model": RAG_CHAT, "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "What is the Louvre?"}]})
    body = resp.json()
    assert resp.status_code == 200 and body["model"] == RAG_CHAT and body["choices"][0]["message"]["content"]
    assert body["sources"][0]["filename"] == "louvre.txt"
    sdk = client.chat.completions.create(model=RAG_CHAT, max_tokens=4, messages=[{"role": "user", "content": "Louvre?"}])
    assert sdk.model_extra["sources"]
    chunks = list(client.chat.completions.create(model=RAG_CHAT, max_tokens=6, stream=True,
                                                 messages=[{"role": "user", "content": "What is the Louvre?"}]))
    assert all(c.object == "chat.completion.chunk" and c.model == RAG_CHAT for c in chunks)
    assert chunks[0].model_extra["sources"][0]["filename"] == "louvre.txt"  # sources on the first chunk only
    assert not any("sources" in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_batch_cancel_and_deletes(client, http, store):
    vs = client.vector_stores.create(name="scratch")
    ids = [client.files.create(file=(f"s{i}.txt", f"scratch document {i} " * 50), purpose="assistants").id
           for i in range(6)]
    batch = client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=ids)
    assert batch.object == "vector_store.files_batch" and batch.file_counts.total == 6
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=vs.id)
    assert cancelled.status == "cancelled"
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id, limit=100).data
    assert len(listed) == 6 and {f.status for f in listed} <= {"cancelled", "completed"}
    assert client.vector_stores.delete(vs.id).deleted
    for i in ids:
        client.files.delete(i)
    error_of(http.get(f"/v1/vector_stores/{vs.id}/file_batches/{batch.id}"), 404)


def test_cli_ingester(client, served, tmp_path, capsys):
    from deployments import cli
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Alpha centauri is the closest star system.")
    (tmp_path / "sub" / "b.md").write_text("# Beta\nBeta decay emits an electron.")
    (tmp_path / "c.bin").write_bytes(b"\x00binary")
    ns = cli.parser().parse_args(["ingest", str(tmp_path), "--vector-store", "cli-store", "--base-url", served[0]])
    assert cli.ingest(ns) == 1  # c.bin is unsupported
    assert "c.bin: unsupported_file" in capsys.readouterr().err
    (vs,) = [v for v in client.vector_stores.list(limit=100) if v.name == "cli-store"]
    assert vs.file_counts.completed == 2 and vs.file_counts.failed == 1
    hit = client.vector_stores.search(vs.id, query="closest star", max_num_results=1).data[0]
    assert hit.filename == "a.txt"
    client.vector_stores.delete(vs.id)


def test_restart_loses_nothing_completed(client, http, served):
    """Kill the vector-store replica mid-ingestion, then restart the app: every file completed
    before is still completed and searchable; nothing stays in_progress."""
    _, data_dir = served
    kept = client.responses.create(model=GEN, input="Say hi.", max_output_tokens=2)
    vs = client.vector_stores.create(name="durable")
    ids = [client.files.create(file=(f"d{i}.txt", f"durable document number {i}. " * 40), purpose="assistants").id
           for i in range(40)]
    client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=ids)
    counts = client.vector_stores.retrieve(vs.id).file_counts
    while counts.completed < 4 and counts.in_progress:
        time.sleep(0.05)
        counts = client.vector_stores.retrieve(vs.id).file_counts
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "VectorStoreServer" in a["name"] and a["namespace"] == "serve"]
    ray.kill(ray.get_actor(replica["name"], namespace="serve"), no_restart=True)
    serve.delete("default")
    completed_before = {f["id"] for f in json.loads(open_store_files(data_dir, vs.id)) if f["status"] == "completed"}
    assert len(completed_before) >= 4
    # two replicas now: both resume the unfinished files; each file still ends completed once
    serve.run(build_app(app_args(data_dir, rag_replicas=2)), name="default", route_prefix="/", blocking=False)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    for _ in range(3000):  # a hang guard, not a time limit: recovery either ends or the test fails
        counts = client.vector_stores.retrieve(vs.id).file_counts
        if counts.in_progress == 0:
            break
        time.sleep(0.2)
    assert counts.completed == 40 and counts.failed == 0
    status = {f.id: f.status for f in client.vector_stores.files.list(vector_store_id=vs.id, limit=100)}
    assert all(status[i] == "completed" for i in completed_before)
    for file_id in list(completed_before)[:4]:  # each file completed before the kill is found by its own text
        number = ids.index(file_id)
        hits = client.vector_stores.search(vs.id, query=f"durable document number {number}.", max_num_results=50).data
        assert file_id in {h.file_id for h in hits}


def test_two_replicas_search_what_one_ingested(client):
    """Runs on the two-replica app of the test above: a file ingested through one replica is
    found by every search, whichever replica answers (each reloads its index when the store's
    version on disk changed). 16 concurrent searches reach both replicas."""
    (vs,) = [v for v in client.vector_stores.list(limit=100) if v.name == "durable"]
    query = "zebras migrate across the Serengeti"

    def search_all() -> list[list[str]]:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda _: [h.filename for h in client.vector_stores.search(
                vs.id, query=query, max_num_results=1).data], range(16)))
    assert all(hits != ["zebra.txt"] for hits in search_all())  # both replicas cache the index without it
    added = client.vector_stores.files.upload_and_poll(vector_store_id=vs.id, file=("zebra.txt", query.encode()))
    assert added.status == "completed"
    assert search_all() == [["zebra.txt"]] * 16
    client.vector_stores.files.delete(added.id, vector_store_id=vs.id)
    assert all(hits != ["zebra.txt"] for hits in search_all())


def open_store_files(data_dir: str, vs_id: str) -> str:
    """The store files' statuses read straight from the SQLite file (the app is down)."""
    import sqlite3
    db = sqlite3.connect(f"{data_dir}/meta.sqlite")
    rows = db.execute("SELECT file_id, status FROM store_files WHERE vector_store_id = ?", (vs_id,)).fetchall()
    db.close()
    return json.dumps([{"id": r[0], "status": r[1]} for r in rows])
