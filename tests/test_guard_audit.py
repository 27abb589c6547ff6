"""Audit log (guardrails.md §8): round trip, no raw text or keys by default, rotation, crashes, threads."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grokstack.errors import ConfigError, InvalidArgumentError
from grokstack.guard.audit import AuditLog, backup_path, key_id, log_files, mask_secrets, read_records

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "xai-" + "k" * 40


def _write(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record(direction="input", action="allow", request_id=f"r{i}", text=f"message number {i}")


def test_round_trip_stores_hashes_not_text_or_keys(tmp_path):
    path = tmp_path / "audit.jsonl"
    text = "How do I reset my router? my key is " + API_KEY
    with AuditLog(path, guard_version="g1") as log:
        written = log.record(direction="input", action="block", codes=["S2", "S2", "S1"], scores={"S2": 0.91234567},
                             text=text, request_id="req-1", key=API_KEY, profile="aup")
        log.record(direction="output", action="allow", request_id="req-1", key_id="abc")
    records = read_records(path)
    assert records[0] == written
    first = records[0]
    assert first["codes"] == ["S1", "S2"] and first["scores"] == {"S2": 0.9123}
    assert first["key_id"] == hashlib.sha256(API_KEY.encode()).hexdigest()[:12] == key_id(API_KEY)
    assert first["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert first["direction"] == "input" and first["action"] == "block" and first["flagged"] is True
    assert first["profile"] == "aup" and first["guard_version"] == "g1" and first["request_id"] == "req-1"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert "text" not in first
    assert records[1]["key_id"] == "abc" and records[1]["text_sha256"] is None and records[1]["flagged"] is False
    raw = path.read_bytes()
    assert b"router" not in raw and API_KEY.encode() not in raw and b"kkkkkkkk" not in raw
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_content_mode_keeps_text_but_masks_secrets(tmp_path):
    path = tmp_path / "audit.jsonl"
    text = f"use {API_KEY} or Bearer abcdefghijklmnopqrstuvwxyz0123 or my-own-key-123 please"
    with AuditLog(path, content=True) as log:
        log.record(direction="input", action="flag", text=text, key="my-own-key-123")
    rec = read_records(path)[0]
    assert rec["text"].startswith("use [secret] or [secret] or [secret] please")
    assert API_KEY not in path.read_text() and "my-own-key-123" not in path.read_text()
    assert rec["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()  # hash of what was checked
    assert mask_secrets("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----") == "[secret]"


def test_record_result_reads_guard_results(tmp_path):
    path = tmp_path / "audit.jsonl"
    result = {"flagged": True, "action": "redact", "codes": ["S7"], "scores": {"S7": 0.8}, "guard_version": "v9"}
    with AuditLog(path) as log:
        log.record_result(result, direction="output", text="x", request_id="r", profile="strict")
    rec = read_records(path)[0]
    assert (rec["action"], rec["codes"], rec["guard_version"], rec["profile"]) == ("redact", ["S7"], "v9", "strict")


def test_bad_arguments_are_refused(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log:
        with pytest.raises(InvalidArgumentError, match="direction"):
            log.record(direction="sideways", action="allow")
        with pytest.raises(InvalidArgumentError, match="action"):
            log.record(direction="input", action="")
    with pytest.raises(InvalidArgumentError, match="closed"):
        log.record(direction="input", action="allow")
    with pytest.raises(ConfigError, match="backups"):
        AuditLog(tmp_path / "b.jsonl", backups=0)
    with pytest.raises(ConfigError, match="max_bytes"):
        AuditLog(tmp_path / "b.jsonl", max_bytes=10)


def test_rotation_keeps_every_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=1500, backups=100, fsync_every=10) as log:
        _write(log, 200)
    files = log_files(path)
    assert len(files) > 10 and files[-1] == path and files[0] == backup_path(path, len(files) - 1)
    assert all(f.stat().st_size <= 1500 for f in files)
    assert [r["request_id"] for r in read_records(path)] == [f"r{i}" for i in range(200)]


def test_rotation_drops_only_the_oldest_files(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=1500, backups=2) as log:
        _write(log, 200)
    assert not backup_path(path, 3).exists()
    ids = [int(r["request_id"][1:]) for r in read_records(path)]
    assert ids == list(range(ids[0], 200)) and ids[0] > 0  # a contiguous newest run


def test_retention_by_age(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=1500, backups=20) as log:
        _write(log, 60)
    old = log_files(path)[0]
    old_ids = {json.loads(line)["request_id"] for line in old.read_bytes().splitlines()}
    stamp = time.time() - 10 * 86400
    os.utime(old, (stamp, stamp))
    kept = [r["request_id"] for r in read_records(path) if r["request_id"] not in old_ids]
    with AuditLog(path, max_bytes=1500, backups=20, max_age_days=7) as log:
        _write(log, 1, start=60)
    assert old_ids and [r["request_id"] for r in read_records(path)] == [*kept, "r60"]


def test_torn_last_line_is_skipped_and_next_record_starts_clean(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _write(log, 3)
    with open(path, "ab") as f:
        f.write(b'{"time":"2026-11-28T10:15:00.000Z","request_id":"torn","dire')  # a crash mid-write
    assert [r["request_id"] for r in read_records(path)] == ["r0", "r1", "r2"]
    with AuditLog(path) as log:
        _write(log, 1, start=3)
    lines = path.read_bytes().split(b"\n")
    assert lines[3].startswith(b'{"time"') and lines[3].endswith(b'"dire')  # the torn line is alone
    assert json.loads(lines[4])["request_id"] == "r3"
    assert [r["request_id"] for r in read_records(path)] == ["r0", "r1", "r2", "r3"]


WRITER = """
import sys
from grokstack.guard.audit import AuditLog
log = AuditLog(sys.argv[1], max_bytes=4000, backups=1000)
i = 0
while True:
    log.record(direction="output", action="allow", request_id=f"r{i}", text="x" * (i % 97), scores={"S1": 0.1})
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_stream_keeps_every_written_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    acked = -1
    try:
        deadline = time.monotonic() + 60
        while acked < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert acked >= 150, "the writer did not get going"
    assert proc.returncode == -signal.SIGKILL
    ids = [int(r["request_id"][1:]) for r in read_records(path)]
    # Whole records, in order, none lost: every acknowledged one (and maybe one more) is there.
    assert ids == list(range(len(ids))) and len(ids) >= acked + 1
    assert len(log_files(path)) > 1  # it rotated along the way
    with AuditLog(path, max_bytes=4000, backups=1000) as log:
        log.record(direction="input", action="block", request_id="after")
    records = read_records(path)
    assert [r["request_id"] for r in records[:-1]] == [f"r{i}" for i in ids]
    assert records[-1]["request_id"] == "after"


def test_threads_write_whole_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=8000, backups=1000, fsync_every=8)
    errors = []

    def worker(t: int) -> None:
        try:
            for i in range(50):
                log.record(direction="retrieved", action="flag", request_id=f"t{t}-{i}", text="y" * (t * 13 + i),
                           codes=["S5"], scores={"S5": i / 50})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert not errors
    for file in log_files(path):
        for line in file.read_bytes().splitlines():
            json.loads(line)  # every line is one whole record
    records = read_records(path)
    assert len(records) == 400
    assert {r["request_id"] for r in records} == {f"t{t}-{i}" for t in range(8) for i in range(50)}
    for t in range(8):  # each thread's records keep their order
        mine = [int(r["request_id"].split("-")[1]) for r in records if r["request_id"].startswith(f"t{t}-")]
        assert mine == list(range(50))
