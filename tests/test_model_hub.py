"""Models from a hub, for real: a loopback hub on 127.0.0.1 with the file API `huggingface_hub` uses,
reached through `HF_ENDPOINT` by processes that run with `models.offline=false`, and the
object-storage mirror (`models.store`) on the moto S3 server.

- A job fetches a hub model once into the node's cache, only the files a snapshot keeps, and a
  second run of the job makes no request to the hub.
- `dermaray models push` mirrors a snapshot to the store; a node with an empty cache and
  `models.offline=true` then pulls it from there without asking the hub.
- Offline with an empty cache, the error names the preset and the command that fetches it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dermaray.config import ModelsConfig
from dermaray.models.registry import COMPLETE_MARKER, resolve_model
from dermaray.storage import read_parquet
from tests.hub_server import LoopbackHub
from tests.serve_artifacts import lesion_table

REPO = Path(__file__).resolve().parents[1]
LLAMA, BERT = "dermaray-test/tiny-llama", "dermaray-test/tiny-bert"
EXTRA_FORMATS = ("pytorch_model.bin", "model.Q4_0.gguf")  # in a hub repository, never part of a snapshot


def repository(role: str, tmp: Path) -> Path:
    """A tiny model as a hub repository holds it, plus weights in formats a snapshot must skip."""
    built = Path(resolve_model(role, "tiny", ModelsConfig(cache_dir=str(tmp / "build"))))
    repo = tmp / f"repo-{role}"
    shutil.copytree(built, repo, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    for name in EXTRA_FORMATS:
        (repo / name).write_bytes(b"\0" * 4096)
    return repo


def online_env(hub: LoopbackHub) -> dict[str, str]:
    """This process's environment with the hub on: no offline switch, the loopback endpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_ADDRESS")}
    return {**env, "HF_ENDPOINT": hub.url, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}


def fetched(hub: LoopbackHub) -> set[str]:
    return {
        path.rsplit("/resolve/", 1)[1].split("/", 1)[1]
        for method, path in hub.requests
        if method == "GET" and "/resolve/" in path
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    with LoopbackHub({LLAMA: repository("note_writer", tmp), BERT: repository("text_encoder", tmp)}) as server:
        yield server


def test_a_job_fetches_a_hub_model_once_per_node_and_reuses_it(hub, tmp_path):
    lesions = tmp_path / "lesions"
    lesions.mkdir()
    pq.write_table(lesion_table(6), lesions / "part-0.parquet")
    cache = tmp_path / "cache"

    def notes_job(output: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "jobs.notes",
            "--config",
            "configs/local.yaml",
            f"notes.input={lesions}",
            f"notes.output={tmp_path / output}",
            "notes.strategy=P2",
            "notes.sampling.max_tokens=8",
            "notes.num_cpus=1",
            "models.offline=false",
            f"models.note_writer=hub:{LLAMA}",
            f"models.cache_dir={cache}",
            "ray.num_cpus=2",
        ]
        return subprocess.run(command, cwd=REPO, env=online_env(hub), capture_output=True, text=True, timeout=300)

    first = notes_job("first")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = cache / "note_writer" / LLAMA.replace("/", "--")
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert fetched(hub) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not fetched(hub) & set(EXTRA_FORMATS) and not any((folder / name).exists() for name in EXTRA_FORMATS)
    summary = json.loads((tmp_path / "first" / "notes_summary.json").read_text())
    assert summary["notes"] + summary["errors"] == 6 and summary["notes"] > 0, summary
    notes = read_parquet(str(tmp_path / "first")).to_pylist()
    assert {n["model_id"] for n in notes} == {LLAMA}

    asked = len(hub.requests)
    second = notes_job("second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(hub.requests) == asked, hub.requests[asked:]  # the node's cache answered: no request at all
    assert read_parquet(str(tmp_path / "second")).num_rows == 6


def test_push_to_the_store_then_an_offline_node_pulls_from_it(hub, s3_options, tmp_path):
    store = "s3://dermaray/model-store"
    push = subprocess.run(
        [
            str(Path(sys.executable).with_name("dermaray")),
            "models",
            "push",
            f"text_encoder/hub:{BERT}",
            "models.offline=false",
            f"models.store={store}",
            f"models.store_options.endpoint_url={s3_options['endpoint_url']}",
            f"models.cache_dir={tmp_path / 'pusher'}",
        ],
        cwd=REPO,
        env=online_env(hub),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert push.returncode == 0, push.stderr[-3000:]
    assert push.stdout.strip().endswith(f"{store}/text_encoder/{BERT.replace('/', '--')}")

    asked = len(hub.requests)
    node = ModelsConfig(cache_dir=str(tmp_path / "node"), offline=True, store=store, store_options=s3_options)
    folder = Path(resolve_model("text_encoder", f"hub:{BERT}", node))
    assert len(hub.requests) == asked  # from the store alone
    pushed = Path(tmp_path / "pusher" / "text_encoder" / BERT.replace("/", "--"))
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in pushed.iterdir()) and COMPLETE_MARKER in names
    assert (folder / "model.safetensors").read_bytes() == (pushed / "model.safetensors").read_bytes()

    from dermaray.grounding.text import TextEncoder

    vectors = TextEncoder(f"hub:{BERT}", node).encode(["an irregular dark lesion"])
    assert vectors.shape == (1, 32)


def test_offline_without_cache_or_store_says_how_to_fetch(tmp_path):
    models = ModelsConfig(cache_dir=str(tmp_path), offline=True)
    with pytest.raises(
        FileNotFoundError, match=r"note_writer/qwen2.5-7b .*models.offline is true.*dermaray models pull note_writer/qwen2.5-7b"
    ):
        resolve_model("note_writer", "qwen2.5-7b", models)
    # Online by config but offline by the submitter's environment (as in this test process): the environment wins, said plainly.
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        resolve_model("note_writer", "qwen2.5-7b", models.model_copy(update={"offline": False}))


def test_a_pinned_revision_is_fetched_and_cached_apart_from_the_default_branch(tmp_path):
    from dermaray.models.registry import get_preset, is_preset
    from jobs.notes import model_id_of

    main = repository("text_encoder", tmp_path)
    pinned = tmp_path / "repo-v1"
    shutil.copytree(main, pinned)
    (pinned / "revision.txt").write_text("v1\n")  # a file only that revision holds
    cache = tmp_path / "cache"
    fetch = (
        "import sys; from dermaray.config import ModelsConfig; from dermaray.models.registry import resolve_model; "
        f"print(resolve_model('text_encoder', sys.argv[1], ModelsConfig(cache_dir={str(cache)!r}, offline=False)))"
    )
    with LoopbackHub({BERT: {"main": main, "v1": pinned, "refs/pr/1": pinned}}) as hub:
        folders = {}
        for revision in ("v1", None, "refs/pr/1"):
            name = f"hub:{BERT}" + (f"@{revision}" if revision else "")
            run = subprocess.run(
                [sys.executable, "-c", fetch, name], cwd=REPO, env=online_env(hub), capture_output=True, text=True, timeout=120
            )
            assert run.returncode == 0, run.stderr[-3000:]
            folders[revision] = Path(run.stdout.strip().splitlines()[-1])
        assert {p for m, p in hub.requests if m == "GET" and "/resolve/" in p and p.endswith("revision.txt")}, hub.requests
    assert folders["v1"] == cache / "text_encoder" / f"{BERT.replace('/', '--')}@v1"
    assert folders["refs/pr/1"].name == f"{BERT.replace('/', '--')}@refs%2Fpr%2F1"  # "a/b" and "a--b" stay apart
    assert (folders["refs/pr/1"] / "revision.txt").is_file()
    assert (folders["v1"] / "revision.txt").read_text() == "v1\n" and not (folders[None] / "revision.txt").exists()
    assert json.loads((folders["v1"] / COMPLETE_MARKER).read_text())["revision"] == "v1"

    # Named presets pin the same way; models built or shipped here have no revisions.
    qwen = get_preset("note_writer", "qwen2.5-7b@0123abc")
    assert (qwen.name, qwen.hub_id, qwen.revision) == ("qwen2.5-7b@0123abc", "Qwen/Qwen2.5-7B-Instruct", "0123abc")
    assert get_preset("note_writer", "hub:org/model@a--b").name != get_preset("note_writer", "hub:org/model@a/b").name
    assert model_id_of("qwen2.5-7b@0123abc") == "Qwen/Qwen2.5-7B-Instruct@0123abc"  # recorded with every note
    assert model_id_of("qwen2.5-7b") == "Qwen/Qwen2.5-7B-Instruct"
    assert is_preset("note_writer", "qwen2.5-7b@v2") and not is_preset("note_writer", str(tmp_path / "weights@v2"))
    with pytest.raises(ValueError, match="only hub models have revisions"):
        get_preset("note_writer", "tiny@v1")
    with pytest.raises(ValueError, match="name a branch, tag or commit"):
        get_preset("note_writer", "hub:org/model@")
    # Offline with nothing cached, the error names the model as the config does, for the command it suggests.
    with pytest.raises(FileNotFoundError, match=r"dermaray models pull note_writer/qwen2\.5-7b@refs/pr/1 "):
        resolve_model("note_writer", "qwen2.5-7b@refs/pr/1", ModelsConfig(cache_dir=str(tmp_path / "offline"), offline=True))
