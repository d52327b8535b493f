"""Write and audit notes for canonical lesion rows with one vLLM engine.

`NoteWriter` is the core that `jobs.notes` puts inside Ray Data actors and the benchmark
runs bare. One bad row (a prompt over the context window, an undecodable image, an
engine error on that prompt) yields a row with its `error`; it never fails the batch.
"""

from __future__ import annotations

import io
import os
from typing import Any

from dermaray.config import NotesConfig
from dermaray.notes.audit import audit_note
from dermaray.notes.prompts import MetadataSwitches, build_messages, prompt_id, template_note


def switches_of(cfg: NotesConfig) -> MetadataSwitches:
    return MetadataSwitches(cfg.label_hierarchy, cfg.demographics_site, cfg.attributes)


class NoteWriter:
    def __init__(self, cfg: NotesConfig, model_path: str | None, model_id: str):
        self.cfg, self.model_id = cfg, model_id if cfg.strategy != "M" else "template"
        self.switches = switches_of(cfg)
        self.prompt_id = prompt_id(cfg.strategy, self.switches)
        self.sampling_json = cfg.sampling.model_dump_json()
        self.llm = None
        if cfg.strategy != "M":
            os.environ.update(cfg.engine_env)  # read by vLLM at import and engine start
            from vllm import LLM, SamplingParams

            self.llm = LLM(
                model=model_path,
                dtype=cfg.dtype,
                enforce_eager=cfg.enforce_eager,
                max_model_len=cfg.max_model_len,
                seed=cfg.sampling.seed or 0,
                **cfg.engine_kwargs,
            )
            self.tokenizer = self.llm.get_tokenizer()
            s = cfg.sampling
            # The seed goes to the engine, not to each request: per-request seeds fail on
            # vLLM's CPU backend ("CPU Generator does not use offset") once requests batch.
            self.params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, ignore_eos=s.ignore_eos)

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
        from PIL import Image

        image = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        return {"prompt": text, "multi_modal_data": {"image": image}}, n_tokens

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

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """NOTES_SCHEMA rows (without `shard`), one per input row, in order."""
        records = [self._record(row) for row in rows]
        if self.llm is None:
            for record, row in zip(records, rows):
                self._finish(record, row, template_note(row, self.switches), None, "template")
            return records
        pending = []
        for i, row in enumerate(rows):
            try:
                pending.append((i, *self.engine_input(row)))
            except Exception as exc:
                records[i]["error"] = _error_text(exc)
        for start in range(0, len(pending), self.cfg.batch_size):
            chunk = pending[start : start + self.cfg.batch_size]
            for (i, _, n_prompt), output in zip(chunk, self._generate([p for _, p, _ in chunk])):
                records[i]["prompt_tokens"] = n_prompt
                if isinstance(output, Exception):
                    records[i]["error"] = _error_text(output)
                    continue
                completion = output.outputs[0]
                records[i]["prompt_tokens"] = len(output.prompt_token_ids)
                records[i]["output_tokens"] = len(completion.token_ids)
                self._finish(records[i], rows[i], completion.text.strip(), None, completion.finish_reason)
        return records

    def _record(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "lesion_id": row["lesion_id"],
            "strategy": self.cfg.strategy,
            "prompt_id": self.prompt_id,
            "model_id": self.model_id,
            "sampling_params": self.sampling_json if self.llm is not None else None,
            "prompt_tokens": None,
            "output_tokens": None,
            "finish_reason": None,
            "note": None,
            "error": None,
            "audit_flags": None,
            "hallucinated": None,
        }

    @staticmethod
    def _finish(record: dict, row: dict, note: str, error: str | None, finish_reason: str | None) -> None:
        audit = audit_note(note, row)
        record.update(note=note, error=error, finish_reason=finish_reason, audit_flags=audit.flag_strings(), hallucinated=audit.hallucinated)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
