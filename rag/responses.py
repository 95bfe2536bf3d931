"""Stored Responses: OpenAI's `store: true` (the default) keeps a response for
`GET /v1/responses/{id}`, `DELETE` and `previous_response_id`, in the vector stores' SQLite
file (one more table), so a restart or another replica finds it.

Each row keeps the response object as returned and the conversation that produced it (every
earlier turn, this request's input messages and the answer), so continuing a conversation is
one lookup, however long the chain of previous responses.
"""
import json

from rag.store import NotFoundError, VectorStores, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL, response TEXT NOT NULL, conversation TEXT NOT NULL);
"""


class StoredResponses:
    def __init__(self, stores: VectorStores):
        self.stores = stores
        with stores.lock:
            stores.db.executescript(SCHEMA)

    def save(self, response: dict, conversation: list[dict]) -> None:
        with self.stores.tx() as db:
            db.execute("INSERT OR REPLACE INTO responses (id, created_at, response, conversation) VALUES (?, ?, ?, ?)",
                       (response["id"], now(), json.dumps(response), json.dumps(conversation)))

    def _row(self, response_id: str, param: str):
        rows = self.stores.query("SELECT * FROM responses WHERE id = ?", (response_id,))
        if not rows:
            raise NotFoundError(f"No response found with id {response_id!r}", param)
        return rows[0]

    def get(self, response_id: str) -> dict:
        return json.loads(self._row(response_id, "response_id")["response"])

    def conversation(self, response_id: str) -> list[dict]:
        """The messages a response continuing `response_id` starts from."""
        return json.loads(self._row(response_id, "previous_response_id")["conversation"])

    def delete(self, response_id: str) -> dict:
        self._row(response_id, "response_id")
        with self.stores.tx() as db:
            db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return {"id": response_id, "object": "response", "deleted": True}
