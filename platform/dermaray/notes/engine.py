"""Write and audit notes for canonical lesion rows with one vLLM engine.

`NoteWriter` is the core that `jobs.notes` puts inside Ray Data actors and the benchmark
runs bare. One bad row (a prompt over the context window, an undecodable image, an
engine error on that prompt, a model that writes nothing) yields a row with its `error`;
it never fails the batch. A note cut at `max_tokens` is kept, with `finish_reason` "length".
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from dermaray.config import NotesConfig
from dermaray.images import decode_rgb
from dermaray.notes.audit import audit_note
from dermaray.notes.prompts import LABEL_FREE, MetadataSwitches, build_messages, prompt_id, template_note

TEMPLATE_MODEL_ID = "template"


def switches_of(cfg: NotesConfig) -> MetadataSwitches:
    return MetadataSwitches(cfg.label_hierarchy and cfg.strategy != LABEL_FREE, cfg.demographics_site, cfg.attributes)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where vLLM runs it faster than float32."""
    try:
        return bool(re.search(r"\b(?:avx512_bf16|amx_bf16)\b", Path(cpuinfo).read_text()))
    except OSError:
        return False


def engine_dtype(setting: str) -> str:
    """`notes.dtype` as given, or for "auto": bfloat16 on a GPU or a bfloat16-capable CPU, else float32."""
    if setting != "auto":
        return setting
    import torch

    return "bfloat16" if torch.cuda.is_available() or cpu_has_bf16() else "float32"


def engine_eager(setting: bool | None) -> bool:
    """`notes.enforce_eager` as given, or for None: eager without a GPU, CUDA graphs with one."""
    if setting is not None:
        return setting
    import torch

    return not torch.cuda.is_available()


class NoteWriter:
    def __init__(self, cfg: NotesConfig, model_path: str | None, model_id: str, with_model: bool = True):
        """`with_model=False` starts no engine: every note is the template (a run whose lesions all get one)."""
        self.cfg, self.model_id = cfg, model_id if cfg.strategy != "M" else TEMPLATE_MODEL_ID
        self.switches = switches_of(cfg)
        self.prompt_id = prompt_id(cfg.strategy, self.switches)
        self.sampling_json = cfg.sampling.model_dump_json()
        self.llm, self.dtype = None, None
        if cfg.strategy != "M" and with_model:
            if cfg.with_image and importlib.util.find_spec("torchvision") is None:
                raise RuntimeError(
                    "notes.with_image: vLLM's multimodal models import torchvision, which this environment lacks "
                    "(GPU vLLM installs ship it; the CPU install removes PyPI's CUDA build)"
                )
            os.environ.update(cfg.engine_env)  # read by vLLM at import and engine start
            if "OMP_NUM_THREADS" in cfg.engine_env:  # torch read it at import: in-process, tell torch too
                import torch

                torch.set_num_threads(int(cfg.engine_env["OMP_NUM_THREADS"]))
            from vllm import LLM, SamplingParams

            self.dtype = engine_dtype(cfg.dtype)
            self.llm = LLM(
                model=model_path,
                dtype=self.dtype,
                enforce_eager=engine_eager(cfg.enforce_eager),
                max_model_len=cfg.max_model_len,
                seed=cfg.sampling.seed or 0,
                **cfg.engine_kwargs,
            )
            self.tokenizer = self.llm.get_tokenizer()
            s = cfg.sampling
            # The seed goes to the engine, not to each request: per-request seeds fail on
            # vLLM's CPU backend ("CPU Generator does not use offset") once requests batch.
            self.params = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                repetition_penalty=s.repetition_penalty,
                ignore_eos=s.ignore_eos,
            )

    def engine_input(self, row: dict[str, Any]) -> tuple[Any, int]:
        """(vLLM prompt, prompt length in tokens) for one lesion; raises on a bad row."""
        messages = build_messages(row, self.cfg.strategy, self.switches, with_image=self.cfg.with_image)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n_tokens = len(self.tokenizer.encode(text, add_special_tokens=False))
        limit = self.cfg.max_model_len - self.cfg.sampling.max_tokens
        if n_tokens > limit:
            raise ValueError(f"prompt_too_long: {n_tokens} tokens > max_model_len - max_tokens = {limit}")
        if not self.cfg.with_image:
            return text, n_tokens
        return {"prompt": text, "multi_modal_data": {"image": decode_rgb(row["image_bytes"])}}, n_tokens

    def _generate(self, inputs: list[Any]) -> list[Any]:
        """Outputs or exceptions, aligned with inputs: a failing prompt is isolated by retrying one by one."""
        try:
            return list(self.llm.generate(inputs, self.params, use_tqdm=False))
        except Exception:
            if len(inputs) == 1:
                raise
        results = []
        for single in inputs:
            try:
                results.append(self.llm.generate([single], self.params, use_tqdm=False)[0])
            except Exception as exc:
                results.append(exc)
        return results

    def write(self, rows: list[dict[str, Any]], by_model: list[bool] | None = None) -> list[dict[str, Any]]:
        """NOTES_SCHEMA rows (without `shard`), one per input row, in order.

        `by_model[i]` False gives row i the template note (strategy M, the same metadata
        switches) instead of the model's; None: the model writes every note.
        """
        if by_model is None:
            by_model = [True] * len(rows)
        records = [self._record(row, model and self.llm is not None) for row, model in zip(rows, by_model, strict=True)]
        pending = []
        for i, row in enumerate(rows):
            if records[i]["model_id"] == TEMPLATE_MODEL_ID:
                self._finish(records[i], row, template_note(row, self.switches), "template")
                continue
            try:
                pending.append((i, *self.engine_input(row)))
            except Exception as exc:
                records[i]["error"] = _error_text(exc)
        for start in range(0, len(pending), self.cfg.batch_size):
            chunk = pending[start : start + self.cfg.batch_size]
            for (i, _, n_prompt), output in zip(chunk, self._generate([p for _, p, _ in chunk]), strict=True):
                records[i]["prompt_tokens"] = n_prompt
                if isinstance(output, Exception):
                    records[i]["error"] = _error_text(output)
                    continue
                completion = output.outputs[0]
                records[i].update(
                    prompt_tokens=len(output.prompt_token_ids),
                    output_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason,
                )
                note, records[i]["error"] = note_or_error(completion)
                if note is not None:
                    self._finish(records[i], rows[i], note, completion.finish_reason)
        return records

    def _record(self, row: dict[str, Any], by_model: bool) -> dict[str, Any]:
        return {
            "lesion_id": row["lesion_id"],
            "strategy": self.cfg.strategy if by_model else "M",
            "prompt_id": self.prompt_id if by_model else prompt_id("M", self.switches),
            "model_id": self.model_id if by_model else TEMPLATE_MODEL_ID,
            "sampling_params": self.sampling_json if by_model else None,
            "prompt_tokens": None,
            "output_tokens": None,
            "finish_reason": None,
            "note": None,
            "error": None,
            "audit_flags": None,
            "hallucinated": None,
        }

    @staticmethod
    def _finish(record: dict, row: dict, note: str, finish_reason: str | None) -> None:
        audit = audit_note(note, row)
        record.update(note=note, finish_reason=finish_reason, audit_flags=audit.flag_strings(), hallucinated=audit.hallucinated)


def note_or_error(completion: Any) -> tuple[str | None, str | None]:
    """(note, None) for a vLLM CompletionOutput with text, else (None, the reason there is no note).

    A note cut at max_tokens is a note: its row keeps `finish_reason` "length" for the summary's count.
    """
    note = completion.text.strip()
    if not completion.token_ids:
        return None, "no_text: the model ended the note before its first token"
    if not note:
        return None, f"empty_note: {len(completion.token_ids)} tokens of whitespace only"
    return note, None


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
