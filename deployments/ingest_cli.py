"""`servecluster ingest DIR --vector-store NAME`: upload a folder into a vector store of a running
server over its OpenAI API, with progress bars.

    servecluster ingest ./docs --vector-store docs --base-url http://localhost:8000 --api-key KEY

Every file under DIR (recursively; --glob narrows it) is uploaded through /v1/files, then
attached with file batches (2,000 files each, OpenAI's limit); the second bar follows the
batches' file_counts until ingestion ends. The store is created if no store has that name.
Files the server cannot parse end `failed` and are listed with their last_error. Exit status 1
if any file failed.
"""
import argparse
import concurrent.futures
import os
import pathlib
import sys
import time

import httpx
from tqdm import tqdm

BATCH_FILES = 2000


def add_ingest_parser(sub) -> None:
    p = sub.add_parser("ingest", help="upload a folder into a vector store of a running server")
    p.add_argument("dir", help="folder to upload (recursively)")
    p.add_argument("--vector-store", required=True, help="vector store name (created if missing) or vs_ id")
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default=os.environ.get("SERVECLUSTER_API_KEY"))
    p.add_argument("--glob", default="**/*", help="which files under DIR (default: all)")
    p.add_argument("--concurrency", type=int, default=8, help="uploads in flight")


def ingest(ns: argparse.Namespace) -> int:
    paths = sorted(p for p in pathlib.Path(ns.dir).glob(ns.glob) if p.is_file())
    if not paths:
        print(f"servecluster ingest: no files under {ns.dir} matching {ns.glob!r}", file=sys.stderr)
        return 1
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    with httpx.Client(base_url=ns.base_url.rstrip("/"), headers=headers, timeout=600) as http:
        vs_id = find_or_create_store(http, ns.vector_store)
        file_ids = upload(http, paths, ns.concurrency)
        batches = [check(http.post(f"/v1/vector_stores/{vs_id}/file_batches",
                                   json={"file_ids": file_ids[i:i + BATCH_FILES]}))["id"]
                   for i in range(0, len(file_ids), BATCH_FILES)]
        follow(http, vs_id, batches, len(file_ids))
        failed = list_all(http, f"/v1/vector_stores/{vs_id}/files", {"filter": "failed"})
    names = dict(zip(file_ids, (str(p) for p in paths)))
    for f in failed:
        if f["id"] in names:
            print(f"failed: {names[f['id']]}: {f['last_error']['code']}: {f['last_error']['message']}", file=sys.stderr)
    print(f"vector store {vs_id}: {len(file_ids) - len(failed)} files ingested, {len(failed)} failed")
    return 1 if failed else 0


def check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise SystemExit(f"servecluster ingest: {response.request.method} {response.request.url.path}: "
                         f"{response.status_code} {response.text}")
    return response.json()


def list_all(http: httpx.Client, path: str, params: dict) -> list[dict]:
    items, after = [], None
    while True:
        page = check(http.get(path, params={**params, "limit": 100, "order": "asc", **({"after": after} if after else {})}))
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def find_or_create_store(http: httpx.Client, name: str) -> str:
    for store in list_all(http, "/v1/vector_stores", {}):
        if name in (store["id"], store["name"]):
            return store["id"]
    return check(http.post("/v1/vector_stores", json={"name": name}))["id"]


def upload(http: httpx.Client, paths: list[pathlib.Path], concurrency: int) -> list[str]:
    def one(path: pathlib.Path) -> str:
        return check(http.post("/v1/files", files={"file": (path.name, path.read_bytes())},
                               data={"purpose": "assistants"}))["id"]

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool, \
            tqdm(total=len(paths), desc="uploading", unit="file") as bar:
        futures = [pool.submit(one, p) for p in paths]
        for _ in concurrent.futures.as_completed(futures):
            bar.update()
        return [f.result() for f in futures]


def follow(http: httpx.Client, vs_id: str, batches: list[str], total: int) -> None:
    with tqdm(total=total, desc="ingesting", unit="file") as bar:
        while True:
            counts = [check(http.get(f"/v1/vector_stores/{vs_id}/file_batches/{b}"))["file_counts"] for b in batches]
            done = sum(c["completed"] + c["failed"] + c["cancelled"] for c in counts)
            bar.update(done - bar.n)
            if not any(c["in_progress"] for c in counts):
                return
            time.sleep(0.5)
