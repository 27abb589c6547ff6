"""Tenant isolation: what one API key stores is never served to another key (issue 13).

An in-process server over a tiny random Grok-2 model, with a keys file of named, renamed (rotated) and
unnamed keys. A hypothesis state machine creates and reads deferred completions with random keys and checks
each answer against a model of who owns what; plain tests pin the scenario that found the bug, the
indistinguishable 404, the route table's auth column, admin-only /metrics, and the upgrade of an old store.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import grokstack
from grokstack.engine import Engine
from grokstack.errors import ConfigError
from grokstack.server.app import Settings, create_app
from grokstack.server.auth import Keys, owner_for
from grokstack.server.deferred import DeferredStore
from grokstack.tiny import make_tiny

MODEL = "m"
# alice-old and alice-new are one tenant (a key rotated under the same name); the unnamed keys are two others
KEYS_FILE = """\
sk-alice-old name=alice
sk-alice-new name=alice
sk-bob name=bob
sk-carol
sk-dave
sk-root name=ops admin
"""
TENANT = {"sk-alice-old": "alice", "sk-alice-new": "alice", "sk-bob": "bob", "sk-carol": "carol",
          "sk-dave": "dave", "sk-root": "ops"}
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
        "deferred": True}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return grokstack.load(make_tiny("grok-2", tmp_path_factory.mktemp("tenant-model")))


def keyed_client(lm, tmp, **settings_args) -> TestClient:
    keys = tmp / "keys.txt"
    keys.write_text(KEYS_FILE)
    engine = Engine(lm, max_batch=4, max_model_len=256)
    app = create_app(lm, engine, Settings(model_id=MODEL, state_dir=tmp / "state", keys_file=str(keys),
                                          **settings_args))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(lm, tmp_path_factory):
    with keyed_client(lm, tmp_path_factory.mktemp("tenants")) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def create(client: TestClient, key: str) -> str:
    r = client.post("/v1/chat/completions", json=BODY, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def read(client: TestClient, key: str, job: str):
    return client.get(f"/v1/chat/deferred-completion/{job}", headers=auth(key))


def wait_done(client: TestClient, store_path, job: str, timeout: float = 30.0) -> None:
    """Until the job's result is stored (looked up in the store itself, so no read consumes it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(store_path) as db:
            row = db.execute("SELECT result FROM jobs WHERE id = ?", (job,)).fetchone()
        if row is not None and row[0] is not None:
            return
        time.sleep(0.05)
    pytest.fail(f"deferred job {job} did not finish in {timeout} s")


def store_path(client: TestClient):
    return client.app.state.api.store.path


# ----------------------------------------------------------------------------- the reported scenario
def test_another_key_gets_404_and_the_owner_still_gets_its_result(client):
    job = create(client, "sk-alice-old")
    wait_done(client, store_path(client), job)
    stolen = read(client, "sk-bob", job)
    assert stolen.status_code == 404
    assert "choices" not in stolen.text
    mine = read(client, "sk-alice-old", job)
    assert mine.status_code == 200 and mine.json()["choices"], mine.text
    assert read(client, "sk-alice-old", job).status_code == 404  # handed out once, as before


def test_a_pending_job_is_404_to_others_and_202_to_its_owner(client):
    api = client.app.state.api
    job = api.store.add(dict(BODY), owner_for("sk-carol", None))  # stored, never run: pending for good
    assert read(client, "sk-dave", job).status_code == 404
    assert read(client, "sk-bob", job).status_code == 404
    assert read(client, "sk-carol", job).status_code == 202


def test_a_rotated_key_under_the_same_name_keeps_its_objects(client):
    job = create(client, "sk-alice-old")
    wait_done(client, store_path(client), job)
    assert read(client, "sk-alice-new", job).status_code == 200


def test_someone_elses_404_is_the_unknown_id_404(client):
    job = create(client, "sk-bob")
    wait_done(client, store_path(client), job)
    theirs = read(client, "sk-carol", job)
    unknown_id = str(uuid.uuid4())
    unknown = read(client, "sk-carol", unknown_id)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.text.replace(job, "ID") == unknown.text.replace(unknown_id, "ID")
    same_headers = {k: v for k, v in theirs.headers.items() if k not in ("x-request-id", "content-length")}
    assert same_headers == {k: v for k, v in unknown.headers.items() if k not in ("x-request-id", "content-length")}
    assert read(client, "sk-bob", job).status_code == 200  # the probe consumed nothing


@pytest.mark.parametrize("job", ["nope", "%00", "a" * 300, "../../etc/passwd", "1;DROP TABLE jobs"])
def test_malformed_ids_are_404(client, job):
    assert read(client, "sk-bob", job).status_code == 404


# ----------------------------------------------------------------------------- the property
class Tenants(RuleBasedStateMachine):
    """Random creates and reads by five keys of four tenants; a model says what each read must answer."""

    client: TestClient  # set by the test below (one server for all examples)
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.owner: dict[str, str] = {}  # job -> tenant
        self.taken: set[str] = set()

    @rule(target=jobs, key=st.sampled_from(sorted(TENANT)))
    def create(self, key):
        job = create(self.client, key)
        self.owner[job] = TENANT[key]
        return job

    @rule(job=jobs, key=st.sampled_from(sorted(TENANT)))
    def read(self, job, key):
        r = read(self.client, key, job)
        if TENANT[key] != self.owner[job] or job in self.taken:
            assert r.status_code == 404, (key, job, r.status_code, r.text)
            assert "choices" not in r.text
            return
        assert r.status_code in (200, 202), r.text
        if r.status_code == 200:
            assert r.json()["choices"]
            self.taken.add(job)

    @rule(job=jobs)
    def wait(self, job):
        wait_done(self.client, store_path(self.client), job) if job not in self.taken else None

    @rule(key=st.sampled_from(sorted(TENANT)))
    def read_unknown(self, key):
        assert read(self.client, key, str(uuid.uuid4())).status_code == 404

    @invariant()
    def nothing_taken_is_still_stored(self):
        api = self.client.app.state.api
        with api.store._lock:
            stored = {row[0] for row in api.store._db.execute("SELECT id FROM jobs")}
        assert not (stored & self.taken)


def test_no_key_ever_sees_another_keys_object(client):
    Tenants.client = client
    machine = Tenants.TestCase
    machine.settings = settings(max_examples=12, stateful_step_count=12, deadline=None, database=None)
    machine().runTest()


# ----------------------------------------------------------------------------- the route table
# the README's route table, as (method, route template)
PUBLIC = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/openapi.json")]
KEYED = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/moderations"),
    ("GET", "/v1/chat/deferred-completion/{request_id}"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id:path}"),
    ("GET", "/v1/language-models"), ("GET", "/v1/language-models/{model_id:path}"), ("POST", "/v1/tokenize-text"),
    ("GET", "/tokenizer_info"), ("POST", "/tokenize"), ("POST", "/detokenize"),
]


def concrete(template: str) -> str:
    return template.replace("{request_id}", "x").replace("{model_id:path}", MODEL)


def test_every_route_is_in_the_table(client):
    served = {(m, r.path) for r in client.app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert served == set(PUBLIC + KEYED)


@pytest.mark.parametrize(("method", "path"), KEYED)
def test_keyed_routes_refuse_no_key_and_a_wrong_key(client, method, path):
    for headers in ({}, auth("sk-wrong")):
        r = client.request(method, concrete(path), json={}, headers=headers)
        assert r.status_code == 401, (method, path, r.text)


@pytest.mark.parametrize(("method", "path"), PUBLIC)
def test_public_routes_answer_without_a_key(client, method, path):
    assert client.request(method, path).status_code == 200


def test_docs_pages_are_not_served(client):
    assert client.get("/docs").status_code == 404  # they load scripts from a CDN an offline server cannot reach


def test_metrics_key_needs_an_admin_key(lm, tmp_path):
    with keyed_client(lm, tmp_path, metrics_key=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth("sk-bob")).status_code == 403
        ok = c.get("/metrics", headers=auth("sk-root"))
        assert ok.status_code == 200 and "grokstack_requests" in ok.text


def test_metrics_key_without_an_admin_key_is_a_config_error(lm, tmp_path):
    engine = Engine(lm, max_batch=1, max_model_len=64)
    with pytest.raises(ConfigError, match="admin"):
        create_app(lm, engine, Settings(model_id=MODEL, state_dir=tmp_path, api_keys=["sk-x"], metrics_key=True))


# ----------------------------------------------------------------------------- keys and stores
def test_owners_are_names_or_hashes_never_the_key(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(KEYS_FILE)
    keys = Keys(["sk-flag"], keys_file)
    owners = {k.secret: k.owner for k in keys.keys}
    assert owners["sk-alice-old"] == owners["sk-alice-new"] == "name:alice"
    assert owners["sk-carol"] != owners["sk-dave"]
    for secret, owner in owners.items():
        assert secret not in owner
    assert [k.secret for k in keys.keys if k.admin] == ["sk-root"]
    assert keys.anonymous.owner is None


def test_open_server_keeps_todays_behaviour(lm, tmp_path):
    engine = Engine(lm, max_batch=2, max_model_len=256)
    app = create_app(lm, engine, Settings(model_id=MODEL, state_dir=tmp_path))
    with TestClient(app) as c:
        job = c.post("/v1/chat/completions", json=BODY).json()["request_id"]
        wait_done(c, app.state.api.store.path, job)
        assert c.get(f"/v1/chat/deferred-completion/{job}").status_code == 200


def test_a_store_from_before_owners_is_upgraded_without_loss(tmp_path):
    path = tmp_path / "deferred.sqlite"
    with sqlite3.connect(path) as db:  # the schema before this change
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, created REAL NOT NULL, request TEXT NOT NULL, "
                   "result TEXT, status INTEGER)")
        db.execute("INSERT INTO jobs VALUES ('old-done', ?, '{}', '{\"ok\": 1}', 200)", (time.time(),))
        db.execute("INSERT INTO jobs VALUES ('old-pending', ?, '{}', NULL, NULL)", (time.time(),))
    store = DeferredStore(path)
    keys = Keys(["sk-a", "sk-b"], None)
    assert [(j, o) for j, _, o in store.pending()] == [("old-pending", None)]
    assert store.take("old-pending", keys.keys[1])[0] == "pending"
    assert store.take("old-done", keys.keys[0]) == ("done", 200, {"ok": 1})  # any valid key reads an old job
    mine = store.add({}, keys.keys[0].owner)
    store.finish(mine, 200, {"x": 1})
    assert store.take(mine, keys.keys[1])[0] == "unknown"
    assert store.take(mine, keys.keys[0]) == ("done", 200, {"x": 1})
    store.close()
