"""The job queue and the history on their own: ordering, skip, queue full, reconcile after a crash."""

from __future__ import annotations

import time

from PIL import Image

from darkroom.home import Home
from darkroom.metadata.images import encode_png
from darkroom.request import GenerationRequest
from darkroom.services.history import History
from darkroom.services.jobs import QueueFull
from tests.server_util import FAST, HANG_GUARD, client, studio_with


def test_queue_full_is_a_clear_503(tmp_path, tiny_model):
    studio = studio_with(Home(tmp_path / "h"), tiny_model("sd1")["path"], start=False, max_queue=2)
    try:
        with client(studio) as c:
            for _ in range(2):
                assert c.post("/api/jobs", json={"prompt": "x", **FAST}).status_code == 202
            r = c.post("/api/jobs", json={"prompt": "x", **FAST})
            assert r.status_code == 503 and "queue full" in r.json()["error"]
            # waiting jobs can be dropped; they never run
            waiting = studio.queue.jobs()[0]
            assert c.post(f"/api/jobs/{waiting.id}/interrupt").json()["state"] == "interrupted"
            assert studio.queue.pending() == 1
    finally:
        studio.close()


def test_skip_abandons_only_the_current_batch(studio):
    job = studio.queue.submit(GenerationRequest(prompt="x", **{**FAST, "steps": 60}, n_iter=3, seed=50))
    deadline = time.monotonic() + HANG_GUARD
    while job.step < 1:  # first batch sampling
        assert time.monotonic() < deadline
        time.sleep(0.01)
    studio.queue.skip()
    studio.queue.wait(job, HANG_GUARD)
    assert job.state == "done" and [im.seed for im in job.images] == [51, 52]


def test_jobs_run_in_submission_order(studio):
    jobs = [studio.queue.submit(GenerationRequest(prompt=f"p{i}", **FAST, seed=i)) for i in range(4)]
    for j in jobs:
        studio.queue.wait(j, 60)
    assert [j.state for j in jobs] == ["done"] * 4
    starts = [j.started for j in jobs]
    assert starts == sorted(starts)
    assert all(a.finished <= b.started for a, b in zip(jobs, jobs[1:], strict=False))


def test_queue_full_exception_type():
    assert QueueFull.status == 503


def test_reconcile_indexes_files_and_forgets_missing(tmp_path):
    outputs = tmp_path / "outputs"
    day = outputs / "txt2img" / "2026-11-22"
    day.mkdir(parents=True)
    for seed in (1, 2):
        text = f"a cat\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 8x8, Model: m"
        (day / f"0000{seed}-{seed}.png").write_bytes(encode_png(Image.new("RGB", (8, 8)), text))
    (day / ".00003-3.png.tmp").write_bytes(b"half a file")  # an interrupted write
    (day / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")  # damaged: left alone
    history = History(tmp_path / "history.sqlite3", outputs)
    assert history.reconcile() == (2, 0)
    assert history.reconcile() == (0, 0)  # idempotent
    total, items = history.search("cat")
    assert total == 2 and {i.seed for i in items} == {1, 2} and items[0].model == "m"
    (day / "00001-1.png").unlink()
    assert history.reconcile() == (0, 1)
    assert history.count() == 1
    history.close()
    # WAL mode, so readers never block the writer
    import sqlite3

    assert sqlite3.connect(tmp_path / "history.sqlite3").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
