from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner.checkpoint import Checkpoint, RowState
from runner.errors import StateError

REPO = Path(__file__).resolve().parents[1]
FP = {"app": "app-id-1", "input": "sha-of-input", "mapping": {"text": "text"}}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "job.state.sqlite"


def done(key: str, index: int, **outputs: object) -> RowState:
    return RowState(key, index, "succeeded", outputs=dict(outputs), attempts=1, workflow_run_id=f"run-{key}")


def test_reopen_keeps_rows_and_results(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0), ("b", 1), ("c", 2)])
        cp.save_results([done("a", 0, text="hi"), RowState("b", 1, "failed", error="boom", http_status=400)])
    with Checkpoint.open(state, FP) as cp:
        assert cp.statuses(["a", "b", "c", "zz"]) == {"a": "succeeded", "b": "failed", "c": "pending"}
        rows = cp.get_rows(["a", "b"])
        assert rows["a"].outputs == {"text": "hi"} and rows["a"].workflow_run_id == "run-a"
        assert rows["b"].error == "boom" and rows["b"].http_status == 400
        assert cp.counts() == {"pending": 1, "running": 0, "succeeded": 1, "failed": 1, "total": 3}


def test_state_uses_wal_journal(state: Path) -> None:
    Checkpoint.open(state, FP).close()
    assert sqlite3.connect(state).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_fingerprint_mismatch_is_refused_naming_the_fields(state: Path) -> None:
    Checkpoint.open(state, FP).close()
    other = {**FP, "input": "another", "mapping": {"text": "body"}}
    with pytest.raises(StateError) as info:
        Checkpoint.open(state, other)
    assert str(info.value) == (
        f"checkpoint {state} belongs to another job (input, mapping differ); "
        "rerun with --fresh to start over or choose another --state"
    )


def test_fingerprint_field_added_or_removed_counts_as_difference(state: Path) -> None:
    Checkpoint.open(state, FP).close()
    with pytest.raises(StateError, match=r"\(app, user differ\)"):
        Checkpoint.open(state, {"input": FP["input"], "mapping": FP["mapping"], "user": "x"})


def test_fingerprint_with_tuples_matches_after_reopen(state: Path) -> None:
    Checkpoint.open(state, {"columns": ("a", "b")}).close()
    Checkpoint.open(state, {"columns": ["a", "b"]}).close()


def test_fresh_wipes_previous_state(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0)])
    with Checkpoint.open(state, {"input": "new"}, fresh=True) as cp:
        assert cp.counts()["total"] == 0
        assert cp.fingerprint == {"input": "new"}


def test_second_opener_is_refused_while_locked(state: Path) -> None:
    with Checkpoint.open(state, FP):
        with pytest.raises(StateError) as info:
            Checkpoint.open(state, FP)
    assert str(info.value) == (
        f"another dify-batch run is using the checkpoint {state} (pid {os.getpid()}); "
        "wait for it to finish or use another --state"
    )


def test_fresh_does_not_wipe_a_state_in_use(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0)])
        with pytest.raises(StateError, match="another dify-batch run"):
            Checkpoint.open(state, FP, fresh=True)
        assert cp.counts()["total"] == 1


def test_lock_refuses_opener_in_another_process(state: Path) -> None:
    code = (
        "from runner.checkpoint import Checkpoint\nfrom runner.errors import StateError\n"
        f"try:\n    Checkpoint.open({str(state)!r}, {FP!r})\nexcept StateError as e:\n    print(e)\n"
    )
    with Checkpoint.open(state, FP):
        result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"another dify-batch run is using the checkpoint {state} (pid {os.getpid()})")


def test_lock_is_released_on_close(state: Path) -> None:
    Checkpoint.open(state, FP).close()
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0)])
    result = run_python(f"from runner.checkpoint import Checkpoint\nCheckpoint.open({str(state)!r}, {FP!r}).close()")
    assert result.returncode == 0, result.stderr


def test_close_twice_is_harmless(state: Path) -> None:
    cp = Checkpoint.open(state, FP)
    cp.close()
    cp.close()


def test_read_only_open_works_while_a_run_holds_the_lock(state: Path) -> None:
    with Checkpoint.open(state, FP) as run:
        run.register_rows([("a", 0), ("b", 1)])
        run.save_results([done("a", 0, x=1)])
        with Checkpoint.open(state, {}, lock=False, check_fingerprint=False) as reader:
            assert reader.fingerprint == FP
            assert reader.counts()["succeeded"] == 1
            assert reader.output_columns() == ["x"]


def test_read_only_open_of_missing_state_is_refused(state: Path) -> None:
    with pytest.raises(StateError, match="no checkpoint at .*nothing has run with this --state yet"):
        Checkpoint.open(state, FP, lock=False)
    with pytest.raises(StateError, match="no checkpoint at"):
        Checkpoint.open(state, {}, check_fingerprint=False)
    assert not state.exists()


def test_read_only_open_still_checks_the_fingerprint(state: Path) -> None:
    Checkpoint.open(state, FP).close()
    with pytest.raises(StateError, match=r"\(input differ\)"):
        Checkpoint.open(state, {**FP, "input": "other"}, lock=False)


def test_missing_parent_folder_is_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope" / "s.sqlite", FP)


def test_saved_row_survives_sigkill(state: Path) -> None:
    code = (
        "import os\nfrom runner.checkpoint import Checkpoint, RowState\n"
        f"cp = Checkpoint.open({str(state)!r}, {FP!r})\n"
        "cp.register_rows([('a', 0), ('b', 1)])\n"
        "cp.mark_started('b', {'workflow_run_id': 'run-b', 'task_id': 'task-b'})\n"
        "cp.save_results([RowState('a', 0, 'succeeded', outputs={'text': 'ok'})])\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = run_python(code)
    assert result.returncode == -9
    with Checkpoint.open(state, FP) as cp:
        assert cp.get_rows(["a"])["a"].outputs == {"text": "ok"}
        [running] = cp.running_with_run_id()
        assert (running.key, running.workflow_run_id, running.task_id) == ("b", "run-b", "task-b")


def test_register_200k_rows_and_look_up_statuses(state: Path) -> None:
    n = 200_000
    keys = [f"row-{i:07d}" for i in range(n)]
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows((key, i) for i, key in enumerate(keys))
        cp.save_results([done(keys[i], i) for i in range(0, n, 1000)])
        found = cp.statuses(keys)
        cp.register_rows((key, i) for i, key in enumerate(keys))  # a resume registers everything again
        assert cp.counts()["total"] == n
    assert len(found) == n
    assert sum(status == "succeeded" for status in found.values()) == n // 1000


def test_register_rows_updates_row_index_of_known_keys(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0), ("b", 1)])
        cp.save_results([done("a", 0, t=1)])
        cp.register_rows([("b", 0), ("a", 1), ("c", 2)])
        assert [(r.key, r.row_index, r.status) for r in cp.iter_rows()] == [
            ("b", 0, "pending"),
            ("a", 1, "succeeded"),
            ("c", 2, "pending"),
        ]


def test_iter_rows_streams_in_row_index_order_across_pages(state: Path) -> None:
    order = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4]
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows((f"k{i}", i) for i in order)
        cp.register_rows([("dup-a", 5), ("dup-b", 5)])  # equal row_index must not be skipped at a page edge
        rows = list(cp.iter_rows(batch=3))
    assert [r.row_index for r in rows] == [0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9]
    assert {r.key for r in rows} == {f"k{i}" for i in order} | {"dup-a", "dup-b"}


def test_iter_rows_filters_by_status(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows((f"k{i}", i) for i in range(10))
        cp.save_results([RowState(f"k{i}", i, "failed", error="x") for i in (8, 2, 5)])
        assert [r.key for r in cp.iter_rows(status="failed", batch=2)] == ["k2", "k5", "k8"]
        assert len(list(cp.iter_rows(status="pending"))) == 7


def test_output_columns_in_first_seen_order_from_succeeded_rows(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0), ("b", 1), ("c", 2)])
        cp.save_results([done("a", 0, summary="s", score=1), RowState("b", 1, "failed", outputs={"debug": 1})])
        cp.save_results([done("c", 2, score=2, label="x", summary="t")])
        assert cp.output_columns() == ["summary", "score", "label"]
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("d", 3)])
        cp.save_results([done("d", 3, extra=1, summary="u")])
        assert cp.output_columns() == ["summary", "score", "label", "extra"]


def test_mark_started_keeps_ids_known_earlier(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0)])
        cp.mark_started("a", {})
        cp.mark_started("a", {"workflow_run_id": "run-1", "task_id": "task-1"})
        cp.mark_started("a", {"conversation_id": "conv-1"})
        row = cp.get_rows(["a"])["a"]
    assert row.status == "running"
    assert (row.workflow_run_id, row.task_id, row.conversation_id) == ("run-1", "task-1", "conv-1")


def test_mark_started_ignores_other_id_names(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0)])
        cp.mark_started("a", {"workflow_id": "wf", "task_id": "t"})
        assert cp.get_rows(["a"])["a"].task_id == "t"


def test_apply_batch_marks_starts_then_saves_results_together(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0), ("b", 1)])
        cp.apply_batch([("a", {"workflow_run_id": "run-a"}), ("b", {"task_id": "t-b"})], [done("a", 0, out=1)])
        rows = cp.get_rows(["a", "b"])
        assert (rows["a"].status, rows["a"].workflow_run_id, rows["a"].outputs) == ("succeeded", "run-a", {"out": 1})
        assert (rows["b"].status, rows["b"].task_id) == ("running", "t-b")
        assert cp.output_columns() == ["out"]


def test_reset_running_keeps_rows_that_can_be_looked_up(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows([("a", 0), ("b", 1), ("c", 2)])
        cp.mark_started("a", {})
        cp.mark_started("b", {"workflow_run_id": "run-b"})
        cp.mark_started("c", {"task_id": "only-task"})
        cp.reset_running()
        assert cp.statuses(["a", "b", "c"]) == {"a": "pending", "b": "running", "c": "pending"}
        assert [r.key for r in cp.running_with_run_id()] == ["b"]


def test_save_results_rejects_unknown_status(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp, pytest.raises(ValueError, match="done"):
        cp.save_results([RowState("a", 0, "done")])


def test_results_written_from_a_worker_thread_are_seen_by_the_loop_thread(state: Path) -> None:
    keys = [f"k{i}" for i in range(2000)]
    with Checkpoint.open(state, FP) as cp:
        cp.register_rows((k, i) for i, k in enumerate(keys))

        def write() -> None:
            for start in range(0, len(keys), 100):
                cp.save_results([done(k, start + j, v=j) for j, k in enumerate(keys[start : start + 100])])

        worker = threading.Thread(target=write)
        worker.start()
        while worker.is_alive():
            cp.statuses(keys[:500])
        worker.join()
        assert cp.counts()["succeeded"] == len(keys)


def test_upload_cache_is_per_user(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        cp.save_upload("abc", "batch-1", "upload-1", "a.pdf")
        assert cp.upload_id("abc", "batch-1") == "upload-1"
        assert cp.upload_id("abc", "batch-2") is None
    with Checkpoint.open(state, FP) as cp:
        assert cp.upload_id("abc", "batch-1") == "upload-1"


def test_conversation_cache_survives_reopen(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        assert cp.conversation_id("customer-7") is None
        cp.save_conversation("customer-7", "conv-uuid")
    with Checkpoint.open(state, FP) as cp:
        assert cp.conversation_id("customer-7") == "conv-uuid"


def test_meta_round_trips_json_values(state: Path) -> None:
    with Checkpoint.open(state, FP) as cp:
        assert cp.meta("job_finished_at") is None
        cp.set_meta("job_finished_at", "2026-01-01T00:00:00Z")
        cp.set_meta("seen", {"a": [1, 2]})
    with Checkpoint.open(state, FP) as cp:
        assert cp.meta("job_finished_at") == "2026-01-01T00:00:00Z"
        assert cp.meta("seen") == {"a": [1, 2]}
        with pytest.raises(ValueError, match="reserved"):
            cp.set_meta("fingerprint", {})


def test_corrupt_file_is_state_error_naming_it(state: Path) -> None:
    state.write_bytes(b"this is not a database at all, just some text" * 100)
    with pytest.raises(StateError) as info:
        Checkpoint.open(state, FP)
    assert str(state) in str(info.value) and "--fresh" in str(info.value)


def test_corrupt_file_is_replaced_with_fresh(state: Path) -> None:
    state.write_bytes(b"garbage" * 1000)
    with Checkpoint.open(state, FP, fresh=True) as cp:
        assert cp.counts()["total"] == 0


def test_foreign_sqlite_database_is_refused(state: Path) -> None:
    conn = sqlite3.connect(state)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="is not a dify-batch checkpoint"):
        Checkpoint.open(state, FP)
