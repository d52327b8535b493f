"""The notes job on a real local Ray cluster with real vLLM (CPU) and a real S3 endpoint."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import s3fs

from dermaray.config import load_config
from dermaray.models import resolve_model
from dermaray.notes.engine import NoteWriter
from dermaray.storage import read_parquet
from jobs import notes
from tests.helpers import read_table

LESIONS = "s3://dermaray/ingest/lesions"
FAST = ["notes.sampling.max_tokens=16", "notes.max_model_len=1024"]


def _config(s3_options, *overrides):
    cfg = load_config(None, [*FAST, *overrides])
    cfg.storage_options = s3_options
    return cfg


def _lesion_ids(s3_options, limit=None):
    ids = sorted(read_parquet(LESIONS, s3_options, columns=["lesion_id"]).column("lesion_id").to_pylist())
    return ids[:limit] if limit else ids


def test_template_notes_for_every_lesion_audit_clean(ingested_on_s3, s3_options, tmp_path):
    summary = notes.run(_config(s3_options, "notes.strategy=M", f"notes.input={LESIONS}", f"notes.output={tmp_path}/m"))
    assert summary["lesions"] == ingested_on_s3["rows_out"] == summary["notes"]
    assert summary["hallucination_rate"] == 0.0 and summary["errors"] == 0
    written = read_parquet(str(tmp_path / "m")).to_pandas()
    assert sorted(written.lesion_id) == _lesion_ids(s3_options)
    assert (written.model_id == "template").all() and written.note.str.len().gt(50).all()


def test_vllm_notes_for_2000_lesions_written_to_s3(ingested_on_s3, s3_options):
    summary = notes.run(_config(s3_options, "notes.strategy=P2", f"notes.input={LESIONS}", "notes.output=s3://dermaray/notes/p2"))
    assert summary["lesions"] == ingested_on_s3["rows_out"] >= 1950
    assert summary["notes"] == summary["lesions"] and summary["errors"] == 0
    written = read_table(s3fs.S3FileSystem(**s3_options), "dermaray/notes/p2")
    assert sorted(written.lesion_id) == _lesion_ids(s3_options)
    assert (written.prompt_id == "P2+label+demo+attr").all() and (written.model_id == "dermaray/note_writer-tiny").all()
    assert written.prompt_tokens.min() > 100 and written.output_tokens.between(1, 16).all()
    assert written.note.notna().all() and written.audit_flags.notna().all()  # a random tiny model may stop at once
    assert '"max_tokens":16' in written.sampling_params.iloc[0]
    # A re-run finds every shard done and writes nothing.
    again = notes.run(_config(s3_options, "notes.strategy=P2", f"notes.input={LESIONS}", "notes.output=s3://dermaray/notes/p2"))
    assert again["shards_written_now"] == 0 and again["notes"] == summary["notes"]


def test_rerun_with_another_plan_is_refused(ingested_on_s3, s3_options, tmp_path):
    notes.run(_config(s3_options, "notes.strategy=M", f"notes.input={LESIONS}", f"notes.output={tmp_path}/x", "notes.limit=10"))
    with pytest.raises(ValueError, match="another plan"):
        notes.run(
            _config(s3_options, "notes.strategy=M", f"notes.input={LESIONS}", f"notes.output={tmp_path}/x", "notes.limit=20")
        )


def test_one_bad_row_does_not_fail_the_batch(ingested_on_s3, s3_options):
    cfg = _config(s3_options, "notes.strategy=P1", "notes.max_model_len=768", "notes.batch_size=8")
    rows = read_parquet(LESIONS, s3_options, columns=notes.input_columns(cfg.notes)).slice(0, 6).to_pylist()
    rows[2]["anatom_site"] = ", ".join(["posterior torso near the left scapula"] * 200)  # far past the window
    writer = NoteWriter(cfg.notes, resolve_model("note_writer", "tiny", cfg.models), "tiny")
    records = writer.write(rows)
    assert [r["lesion_id"] for r in records] == [r["lesion_id"] for r in rows]
    assert records[2]["note"] is None and records[2]["error"].startswith("ValueError: prompt_too_long")
    assert all(r["error"] is None and r["note"] and r["output_tokens"] > 0 for i, r in enumerate(records) if i != 2)


def _shards(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("notes-*.parquet")} if folder.exists() else {}


def _settled(folder: Path) -> dict[str, float]:
    seen = _shards(folder)
    while True:
        time.sleep(2)
        now = _shards(folder)
        if now == seen:
            return now
        seen = now


def test_killed_driver_resumes_exactly_once(ingested_on_s3, s3_options, ray_cluster, tmp_path):
    """SIGKILL the job's driver mid-run; the re-run writes only the missing shards."""
    out = tmp_path / "resume"
    args = [*FAST, "notes.strategy=P2", f"notes.input={LESIONS}", f"notes.output={out}", "notes.limit=600", "notes.shard_size=40"]
    args += [f"storage_options.{k}={v}" for k, v in s3_options.items()]
    args += [f"ray.address={ray_cluster.get_runtime_context().gcs_address}"]
    driver = subprocess.Popen([sys.executable, "-m", "jobs.notes", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_shards(out)) < 3 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    before = _settled(out)  # Ray stops the dead driver's engine actor; it may finish one more shard first
    assert 3 <= len(before) < 15, "the kill must land mid-run"

    summary = notes.run(
        _config(
            s3_options,
            "notes.strategy=P2",
            f"notes.input={LESIONS}",
            f"notes.output={out}",
            "notes.limit=600",
            "notes.shard_size=40",
        )
    )
    after = _shards(out)
    assert len(after) == 15 and summary["shards_written_now"] == 15 - len(before)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished work was not redone
    written = read_parquet(str(out)).to_pandas()
    assert sorted(written.lesion_id) == _lesion_ids(s3_options, 600)  # none missing, none twice


def test_killed_engine_actor_loses_nothing(ingested_on_s3, s3_options, ray_cluster, tmp_path):
    """SIGKILL the engine actor's process mid-run: Ray Data restarts it and retries its shard."""
    from ray.util.state import list_actors

    out = tmp_path / "actor"
    killed = []

    def kill_engine_after_first_shard():
        # Find the engine actor first (the state API is slow), then kill it the moment a shard lands.
        deadline, pids = time.time() + 240, []
        while not pids and time.time() < deadline:
            pids = [
                a.pid
                for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                if "ShardWriter" in a.class_name and a.pid
            ]
            time.sleep(0.2)
        while not _shards(out) and time.time() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_engine_after_first_shard, daemon=True)
    killer.start()
    summary = notes.run(
        _config(
            s3_options,
            "notes.strategy=P2",
            f"notes.input={LESIONS}",
            f"notes.output={out}",
            "notes.limit=400",
            "notes.shard_size=40",
        )
    )
    killer.join(timeout=10)
    assert killed, "no engine actor was found to kill"
    assert summary["notes"] == 400 and summary["errors"] == 0
    assert sorted(read_parquet(str(out)).column("lesion_id").to_pylist()) == _lesion_ids(s3_options, 400)


def test_label_free_notes_by_the_model_for_a_count_templates_for_the_rest(ingested_on_s3, s3_options, tmp_path):
    cfg = _config(
        s3_options,
        "notes.strategy=LF",
        "notes.model_lesions=30",
        "notes.limit=200",
        f"notes.input={LESIONS}",
        f"notes.output={tmp_path}/lf",
    )
    summary = notes.run(cfg)
    written = read_parquet(str(tmp_path / "lf")).to_pandas()
    lesions = read_parquet(LESIONS, s3_options, columns=["lesion_id", "split"]).to_pandas().set_index("lesion_id")
    by_model = written[written.model_id != "template"]
    assert summary["lesions"] == 200 == summary["notes"] + summary["errors"]
    assert len(by_model) == 30 and summary["notes_by_model"] + summary["notes_by_template"] == summary["notes"]
    assert (by_model.prompt_id == "LF+demo+attr").all() and (
        written[written.model_id == "template"].prompt_id == "M+demo+attr"
    ).all()
    # The test split is written by the model first (the classifier is evaluated there).
    tests = lesions.loc[written.lesion_id].split.eq("test").to_numpy()
    assert tests[written.model_id.ne("template").to_numpy()].all() or tests.sum() < 30
    assert summary["dtype"] in ("bfloat16", "float32")
    assert summary["engine_start_seconds"] + summary["shard_seconds"] <= summary["seconds_this_run"]
    # Flag counts count notes, as dermaray.notes.audit.flag_counts does (not flags: a note may have two of one code).
    per_note = Counter(code for flags in written.audit_flags.dropna() for code in {f.split(":")[0] for f in flags})
    assert summary["audit_flag_counts"] == dict(per_note)
    # Notes cut at max_tokens (16 here) stay notes, counted; the rows say so.
    assert summary["cut_at_max_tokens"] == int((written.finish_reason == "length").sum()) > 0
    # Label-free: neither the model's prompt nor the template names the diagnosis.
    rows = read_parquet(LESIONS, s3_options, columns=notes.input_columns(cfg.notes)).slice(0, 3).to_pylist()
    from dermaray.notes.prompts import build_messages

    for row in rows:
        text = build_messages(row, "LF")[1]["content"]
        assert "Diagnosis" not in text and "Superclass" not in text and "Anatomic site" in text


def test_a_note_without_text_is_an_error_row_with_its_reason():
    from vllm.outputs import CompletionOutput

    from dermaray.notes.engine import note_or_error

    def completion(text, tokens, reason="stop"):
        return CompletionOutput(
            index=0, text=text, token_ids=tokens, cumulative_logprob=None, logprobs=None, finish_reason=reason
        )

    assert note_or_error(completion("", [])) == (None, "no_text: the model ended the note before its first token")
    assert note_or_error(completion(" \n\t ", [220, 198, 197]))[1].startswith("empty_note: 3 tokens")
    assert note_or_error(completion(" A brown macule", [1, 2, 3], "length")) == ("A brown macule", None)


def test_a_run_without_lesions_for_the_model_starts_no_engine(ingested_on_s3, s3_options, tmp_path):
    summary = notes.run(
        _config(
            s3_options,
            "notes.strategy=LF",
            "notes.model_lesions=0",
            "notes.limit=20",
            "models.note_writer=/nonexistent/model",
            f"notes.input={LESIONS}",
            f"notes.output={tmp_path}/none",
        )
    )
    assert summary["notes_by_model"] == 0 and summary["notes_by_template"] == 20 and summary["dtype"] is None
