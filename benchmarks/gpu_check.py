"""GPU readiness check: the training and inference cores on one device, without Ray, vLLM or a network.

    python benchmarks/gpu_check.py                  # cuda:0 at cluster-like sizes, under 8 minutes
    python benchmarks/gpu_check.py --device cpu     # a smoke run at tiny sizes (CI runs it)
    make gpu-check

For a machine with an NVIDIA GPU and nothing but torch, transformers, peft and safetensors (no
Ray, vLLM, diffusers or faiss needed; what is missing is skipped and said so). Models are built
from configs with random weights, shaped like the real ones on a GPU:

- grounding: LoRA training steps of an image embedder shaped like LLaVA-1.5-7B's (CLIP
  ViT-L/14-336 tower, projector to 4096) with attribute heads, in fp32, bf16-mixed and
  bf16-mixed with gradient checkpointing: steps/s, peak memory, and the loss after the same
  steps on the same batches (agreement of mixed precision with fp32);
- diffusion: LoRA steps of a UNet with SD 1.5's channel widths (320, 640, 1280, 1280; one
  layer per block instead of two) on 512 px latents (64 x 64), fp32 vs fp16-mixed vs
  bf16-mixed (needs diffusers);
- embedding: images/s of the embedder's forward pass, fp32 vs bf16 autocast;
- search: exact top-10 search of 100k x 4096 in torch on the device, and faiss's flat index
  on CPU when faiss is installed.

Every figure is measured in this run; ratios compare settings side by side on the same device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # no install needed

import torch

from dermaray.grounding.vision import ImageEmbedder
from dermaray.models.tiny import LLAVA_15_TEXT, LLAVA_15_VISION
from dermaray.optimizer_step import OptimizerStep, cast_frozen, enable_gradient_checkpointing


@dataclass(frozen=True)
class Sizes:
    vision: dict  # CLIPVisionConfig arguments of the tower
    lm_width: int  # the projector's output: the language model's width
    batch: int
    steps: int
    unet_widths: tuple[int, ...]
    latent: int
    unet_batch: int
    gallery: int

    @property
    def image(self) -> int:
        return self.vision["image_size"]


TINY_VISION = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
GPU = Sizes(LLAVA_15_VISION, LLAVA_15_TEXT["hidden_size"], 16, 20, (320, 640, 1280, 1280), 64, 4, 100_000)
CPU = Sizes(TINY_VISION, 64, 8, 4, (32, 64), 8, 2, 2_000)


@dataclass
class Row:
    check: str
    setting: str
    throughput: str
    memory: str
    note: str = ""


class Device:
    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> str:
        return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB" if self.cuda else "n/a on CPU"

    def timed(self, fn: Callable[[], object], repeats: int) -> float:
        """Seconds per call after one warm-up call."""
        fn()
        self.sync()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - started) / repeats


def embedder(s: Sizes) -> ImageEmbedder:
    """A LLaVA-1.5-shaped vision tower and projector (random weights, built from configs)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.clip.modeling_clip import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision = CLIPVisionConfig(**s.vision)
    text = LlamaConfig(hidden_size=s.lm_width, num_hidden_layers=1, num_attention_heads=max(1, s.lm_width // 128), vocab_size=32)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)
    return ImageEmbedder(CLIPVisionModel(vision), LlavaMultiModalProjector(config), -2, True)


class Grounder(torch.nn.Module):
    """The grounding model's shape: embedder with LoRA on q/v, trainable projector, 10 attribute heads."""

    def __init__(self, s: Sizes):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.embedder = embedder(s)
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), self.embedder.vision_tower)
        for name, p in self.embedder.named_parameters():
            p.requires_grad = name.startswith("projector.") or "lora_" in name
        self.heads = torch.nn.Linear(s.lm_width, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.heads(self.embedder(pixels))


def grounding_run(s: Sizes, dev: Device, precision: str, checkpointing: bool, batches: list) -> tuple[float, list[float], str]:
    """(seconds per step, the loss of every step, peak memory) of LoRA grounding steps in one setting."""
    torch.manual_seed(0)
    model = cast_frozen(Grounder(s), precision).to(dev.device).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    step = OptimizerStep(params, torch.optim.AdamW(params, lr=1e-4), precision, dev.device.type, max_grad_norm=1.0)
    order = itertools.cycle([(x.to(dev.device), y.to(dev.device)) for x, y in batches])
    trace: list[float] = []

    def one() -> None:
        x, y = next(order)
        with step.autocast():
            loss = torch.nn.functional.huber_loss(model(x).float(), y)
        step.backward(loss)
        trace.append(float(loss.detach()))

    dev.reset_peak()
    seconds = dev.timed(one, s.steps)
    return seconds, trace, dev.peak()


def grounding(s: Sizes, dev: Device, precisions: list[str]) -> list[Row]:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(s.batch, 3, s.image, s.image, generator=generator), torch.randn(s.batch, 10, generator=generator))
        for _ in range(4)
    ]
    rows, losses = [], {}
    settings = [(p, False) for p in precisions] + ([("bf16-mixed", True)] if "bf16-mixed" in precisions else [])
    for precision, checkpointing in settings:
        seconds, trace, peak = grounding_run(s, dev, precision, checkpointing, batches)
        name = precision + (" + checkpointing" if checkpointing else "")
        losses[name] = trace[-1]
        note = f"loss after {len(trace)} steps {trace[-1]:.5f}"
        if name != "fp32" and "fp32" in losses:
            note += f" (fp32 {losses['fp32']:.5f}, |diff| {abs(trace[-1] - losses['fp32']):.5f})"
        rows.append(Row("grounding LoRA step", name, f"{1 / seconds:.2f} steps/s (batch {s.batch})", peak, note))
    return rows


def diffusion_run(s: Sizes, dev: Device, precision: str) -> tuple[float, str]:
    """(seconds per step, peak memory) of LoRA denoising steps of an SD-1.5-wide UNet in one setting."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=s.latent,
        block_out_channels=s.unet_widths,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (len(s.unet_widths) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(s.unet_widths) - 1),
        cross_attention_dim=768 if dev.cuda else 32,
        attention_head_dim=8,
        norm_num_groups=32 if dev.cuda else 8,
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    )
    unet = cast_frozen(unet, precision).to(dev.device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    step = OptimizerStep(params, torch.optim.AdamW(params, lr=1e-4), precision, dev.device.type, max_grad_norm=1.0)
    latents = torch.randn(s.unet_batch, 4, s.latent, s.latent, device=dev.device)
    text = torch.randn(s.unet_batch, 77, unet.config.cross_attention_dim, device=dev.device)

    def one() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (s.unet_batch,), device=dev.device)
        with step.autocast():
            prediction = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        step.backward(torch.nn.functional.mse_loss(prediction.float(), noise))

    dev.reset_peak()
    seconds = dev.timed(one, max(2, s.steps // 2))
    return seconds, dev.peak()


def diffusion(s: Sizes, dev: Device, precisions: list[str]) -> list[Row]:
    rows = []
    for precision in precisions:
        seconds, peak = diffusion_run(s, dev, precision)
        throughput = f"{1 / seconds:.2f} steps/s (batch {s.unet_batch}, {s.latent * 8} px)"
        rows.append(Row("diffusion LoRA step", precision, throughput, peak))
    return rows


def embedding(s: Sizes, dev: Device) -> list[Row]:
    model = embedder(s).to(dev.device).eval()
    pixels = torch.randn(4 * s.batch, 3, s.image, s.image, device=dev.device)
    rows, reference = [], None
    for precision, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        with torch.no_grad(), torch.autocast(dev.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            dev.reset_peak()
            seconds = dev.timed(lambda: model(pixels), 3)
            z = model(pixels).float()
        note = ""
        if reference is None:
            reference = z
        else:
            cosine = torch.nn.functional.cosine_similarity(z, reference).min()
            note = f"min cosine to fp32 {float(cosine):.4f}"
        rows.append(Row("embedding forward", precision, f"{len(pixels) / seconds:.0f} images/s", dev.peak(), note))
    return rows


def search(s: Sizes, dev: Device, skipped: list[str]) -> list[Row]:
    dim, k = s.lm_width, 10
    gallery = torch.nn.functional.normalize(torch.randn(s.gallery, dim, device=dev.device), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(256, dim, device=dev.device), dim=1)
    rows = []
    for name, dtype in (("torch fp32", torch.float32), ("torch bf16", torch.bfloat16)):
        g, q = gallery.to(dtype), queries.to(dtype)
        seconds = dev.timed(lambda: (q @ g.T).topk(k, dim=1), 5)  # noqa: B023 (used at once)
        rows.append(Row("exact search top-10", f"{name}, {s.gallery:,} x {dim}", f"{len(queries) / seconds:.0f} queries/s", ""))
    try:
        import faiss
    except ImportError:
        skipped.append("search: faiss's flat index (faiss is not installed)")
        return rows
    index = faiss.IndexFlatIP(dim)
    index.add(gallery.float().cpu().numpy())
    q = queries.float().cpu().numpy()
    started = time.perf_counter()
    index.search(q, k)
    rows.append(
        Row(
            "exact search top-10",
            f"faiss flat, CPU, {s.gallery:,} x {dim}",
            f"{len(q) / (time.perf_counter() - started):.0f} queries/s",
            "",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the table to this file")
    args = parser.parse_args()
    dev = Device(args.device)
    sizes = GPU if dev.cuda else CPU
    started, skipped, rows = time.perf_counter(), [], []
    name = torch.cuda.get_device_name(dev.device) if dev.cuda else "CPU"
    print(
        f"device: {name} ({args.device}); torch {torch.__version__}; sizes: {'cluster-like' if dev.cuda else 'tiny (smoke run)'}"
    )
    precisions = ["fp32", "bf16-mixed"]
    if dev.cuda and not torch.cuda.is_bf16_supported():
        precisions = ["fp32", "fp16-mixed"]
        skipped.append("bf16-mixed: this GPU has no bfloat16")
    rows += grounding(sizes, dev, precisions)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        skipped.append("diffusion LoRA step (diffusers is not installed)")
    else:
        rows += diffusion(sizes, dev, ["fp32", "fp16-mixed", *precisions[1:]] if "bf16-mixed" in precisions else precisions)
    rows += embedding(sizes, dev)
    rows += search(sizes, dev, skipped)
    if not dev.cuda:
        skipped.append("peak memory (torch keeps no allocator statistics on CPU)")

    widths = [
        max(len(getattr(r, f)) for r in rows + [Row("check", "setting", "throughput", "peak memory", "note")])
        for f in Row.__dataclass_fields__
    ]
    header = Row("check", "setting", "throughput", "peak memory", "note")
    for row in [header, *rows]:
        print("  ".join(getattr(row, f).ljust(w) for f, w in zip(Row.__dataclass_fields__, widths, strict=True)).rstrip())
    for line in skipped:
        print(f"skipped: {line}")
    print(f"finished in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": [r.__dict__ for r in rows], "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
