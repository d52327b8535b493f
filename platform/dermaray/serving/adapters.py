"""One diffusion pipeline per generation replica, with LoRA adapters loaded and swapped by diagnosis.

    bank = AdapterBank("out/diffusion")             # <root>/base, <root>/adapter, <root>/adapters/<code>
    bank = AdapterBank(adapters_folder, base=resolve_model("diffusion_base", "sd-1.5", cfg.models))  # a hub base
    bank.load("MEL")                                # per-diagnosis adapter if trained, else the shared one
    pngs, info = bank.generate("MEL", count=2, seed=0, steps=20)
    bank.release("MEL")

Adapters are named diffusers LoRA adapters on the one base pipeline (`load_lora_weights(...,
adapter_name=)`, `set_adapters`, `delete_adapters`), never copies of the pipeline. Diagnoses
without an adapter of their own share the adapter trained on every class, prompted with their
class caption; it is loaded once and counted per diagnosis using it. The Serve deployment bounds
how many diagnoses are loaded (`serve.multiplexed`) and calls `release` on eviction.

One lock serialises pipeline use: diffusers' active-adapter state is per pipeline, so two
generations with different adapters must not interleave.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from dermaray.diffusion.captions import caption
from dermaray.diffusion.ip_adapter import base_ip_adapter
from dermaray.diffusion.pipeline import LORA_WEIGHT_NAME, generate, load_pipeline
from dermaray.layout import DIFFUSION_BASE, PER_DIAGNOSIS_ADAPTERS, SHARED_ADAPTER
from dermaray.schema import DIAGNOSES_BY_CODE
from dermaray.serving.checks import RequestError

SHARED = "shared"  # the adapter name of <root>/adapter


class AdapterBank:
    def __init__(
        self, root: str | Path, device: str | None = None, resolution: int | None = None, base: str | Path | None = None
    ):
        """`base`: the pipeline folder the adapters were trained on (a hub base resolved on this node);
        None: `<root>/base`, the tiny base the diffusion job pre-trained."""
        import torch

        root = Path(root)
        device = device or ("cuda" if torch.cuda.is_available() else None)
        # Half precision on GPUs (as diffusers serves SD); float32 on CPUs, where fp16 is slow.
        self.pipe = load_pipeline(
            base or root / DIFFUSION_BASE, device=device, dtype=torch.float16 if device == "cuda" else torch.float32
        )
        # The IP-Adapter trained with the tiny base, if it was: image prompts for guided references.
        self.ip_adapter = base_ip_adapter(base or root / DIFFUSION_BASE)
        self.shared_folder = root / SHARED_ADAPTER
        self.per_diagnosis_root = root / PER_DIAGNOSIS_ADAPTERS
        self.resolution = resolution
        self.users: dict[str, set[str]] = {}  # loaded adapter name -> diagnoses holding it
        self.lock = threading.Lock()

    def source(self, code: str) -> tuple[str, Path | None]:
        """(adapter name, folder) for a diagnosis: its own adapter, else the shared one, else the bare base."""
        if code not in DIAGNOSES_BY_CODE:
            raise RequestError(422, f"unknown diagnosis code; valid codes: {', '.join(DIAGNOSES_BY_CODE)}")
        own = self.per_diagnosis_root / code
        if (own / LORA_WEIGHT_NAME).is_file():
            return code, own
        if (self.shared_folder / LORA_WEIGHT_NAME).is_file():
            return SHARED, self.shared_folder
        return "base", None

    @property
    def loaded(self) -> list[str]:
        with self.lock:
            return sorted(self.users)

    def load(self, code: str) -> str:
        with self.lock:
            return self._hold(code)

    def _hold(self, code: str) -> str:
        name, folder = self.source(code)
        if folder is not None and name not in self.users:
            self.pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=name)
            self.users[name] = set()
        if folder is not None:
            self.users[name].add(code)
        return name

    def release(self, code: str) -> None:
        with self.lock:
            name, folder = self.source(code)
            holders = self.users.get(name)
            if holders is None:
                return
            holders.discard(code)
            if not holders:
                self.pipe.delete_adapters([name])
                del self.users[name]

    def generate(
        self,
        code: str,
        count: int,
        seed: int,
        steps: int,
        guidance_scale: float,
        should_stop: Callable[[], bool] | None = None,
        guide: Image.Image | None = None,
        strength: float = 0.6,
        ip_adapter_scale: float | None = None,
    ) -> tuple[list[bytes], dict[str, Any]]:
        """`count` PNGs of diagnosis `code`, image i from seed + i; loads its adapter if it was released meanwhile.
        `should_stop`: asked after every denoising step (see dermaray.diffusion.pipeline.generate). `guide`:
        generated from that image (img2img at `strength`), so the references resemble it; with `ip_adapter_scale`
        and an IP-Adapter beside the base, the guide is their image prompt as well."""
        prompt = caption(code)
        ip_scale = ip_adapter_scale if guide is not None and self.ip_adapter is not None else None
        with self.lock:
            name, folder = self.source(code)
            # Evicted between the multiplexer's load and this call: load it for this call only.
            temporary = folder is not None and name not in self.users
            if temporary:
                self.pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=name)
                self.users[name] = set()
            has_adapters = bool(getattr(self.pipe.unet, "peft_config", None))
            try:
                if folder is not None:
                    self.pipe.set_adapters([name])
                elif has_adapters:
                    self.pipe.disable_lora()  # the bare base: no other diagnosis' adapter may leak in
                images = generate(
                    self.pipe,
                    [prompt],
                    count,
                    seed=seed,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    resolution=self.resolution,
                    should_stop=should_stop,
                    guides=None if guide is None else [guide],
                    strength=strength,
                    **({} if ip_scale is None else {"ip_adapter_folder": self.ip_adapter, "ip_adapter_scale": ip_scale}),
                )
            finally:
                if folder is None and has_adapters:
                    self.pipe.enable_lora()
                if temporary and not self.users[name]:
                    self.pipe.delete_adapters([name])
                    del self.users[name]
        pngs = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        adapter = "per_diagnosis" if name == code else SHARED if name == SHARED else "none"
        return pngs, {
            "diagnosis": code,
            "diagnosis_name": DIAGNOSES_BY_CODE[code].name,
            "prompt": prompt,
            "adapter": adapter,
            "seed": seed,
            "steps": steps,
            "strength": None if guide is None else strength,
            "ip_adapter_scale": ip_scale,
        }
