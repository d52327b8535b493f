"""Peak host memory of loading a LLaVA-1.5-shaped checkpoint whole vs only its vision tower + projector.

    .venv/bin/python benchmarks/vision_load_memory.py                # 4 of LLaVA-1.5-7B's 32 decoder layers
    .venv/bin/python benchmarks/vision_load_memory.py --lm-layers 8

The checkpoint has LLaVA-1.5-7B's shapes: the CLIP ViT-L/14-336 tower (24 layers, width 1024),
its 2-layer projector to 4096, and a Llama of width 4096 (intermediate 11008, vocabulary 32064)
with `--lm-layers` of its 32 decoder layers, random weights, float16, in 2 GB safetensors
shards with an index, as on the hub. Each load runs in a fresh process; its peak RSS
(VmHWM) is printed beside the other, with the ratio. The full load is what the grounding
embedder did before (AutoModelForImageTextToText in float32, then keep two parts); the
vision-only load is `ImageEmbedder.from_pretrained`. The full 7B model adds the remaining
decoder layers (about 0.8 GB each in float32) to the full load only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dermaray.models.tiny import LLAVA_15_DECODER_LAYERS, LLAVA_15_TEXT, LLAVA_15_VISION

LOAD = {
    "full": (
        "import torch; from transformers import AutoModelForImageTextToText as M; "
        "m = M.from_pretrained(PATH, dtype=torch.float32); parts = (m.model.vision_tower, m.model.multi_modal_projector)"
    ),
    "vision-only": "from dermaray.grounding.model import ImageEmbedder; e = ImageEmbedder.from_pretrained(PATH)",
}


def build(folder: Path, lm_layers: int) -> int:
    """A LLaVA-1.5-7B-shaped checkpoint with `lm_layers` decoder layers; its size on disk in bytes."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(**LLAVA_15_VISION)
    text = LlamaConfig(**LLAVA_15_TEXT, num_hidden_layers=lm_layers)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2, image_token_id=32000)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(torch.float16)  # random enough: memory is what is measured
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="2GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def peak_rss(mode: str, folder: Path) -> int:
    """Peak RSS in bytes of a fresh process that imports what it needs and then loads `folder`."""
    # VmHWM, not ru_maxrss: the latter carries this (forking) process's memory over into the child.
    code = (
        "import re, torch, transformers, dermaray.grounding.model; "
        f"PATH = {str(folder)!r}; {LOAD[mode]}; "
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return int(out[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-shaped-") as tmp:
        folder = Path(tmp)
        size = build(folder, args.lm_layers)
        shards = len(list(folder.glob("*.safetensors")))
        rss = {mode: peak_rss(mode, folder) for mode in LOAD}
    gb = 1e9
    layers = f"{args.lm_layers}/{LLAVA_15_DECODER_LAYERS} decoder layers"
    print(f"checkpoint: LLaVA-1.5-7B shapes, {layers}, {size / gb:.2f} GB float16 in {shards} shards")
    print(f"{'load':<12} {'peak RSS GB':>12}")
    for mode, value in rss.items():
        print(f"{mode:<12} {value / gb:>12.2f}")
    print(f"vision-only / full: {rss['vision-only'] / rss['full']:.3f}")


if __name__ == "__main__":
    main()
