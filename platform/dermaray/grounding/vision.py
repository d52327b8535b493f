"""An MLLM's vision tower + projector as an image embedder, loaded without its language model.

Torch, transformers and safetensors only (no Ray, no config), so `benchmarks/gpu_check.py` runs it
on a bare GPU machine.

    embedder = ImageEmbedder.from_pretrained(path)  # reads only vision_tower.* and multi_modal_projector.*
    z = embedder(pixel_values)                      # [B, D]: the projector's tokens, mean-pooled
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn


class ImageEmbedder(nn.Module):
    """Vision tower + projector of a LLaVA-family model; embedding = mean over image tokens. A ViT tower's tokens
    are its patches; a convolutional one's (FastVLM) the places of its feature map, flattened as FastVLM does."""

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        feature_layer: int,
        drop_cls: bool,
        normalization: tuple[list[float], list[float]] | None = None,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.normalization = normalization  # the image processor's (mean, std): pixels = (rgb - mean) / std

    @classmethod
    def from_pretrained(cls, model_path: str, dtype: torch.dtype = torch.float32) -> ImageEmbedder:
        """The vision tower and projector of the checkpoint at `model_path`, and nothing else: their weights
        are read from the safetensors files by name, so a 7B model's language model (about 90% of it)
        is never read or allocated."""
        import sys

        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText
        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(model_path)
        if not hasattr(config, "vision_feature_layer"):
            raise NotImplementedError(
                f"{model_path}: {config.model_type} is not a LLaVA-family model; the grounding embedder reads "
                "vision_tower + multi_modal_projector (llava, llava_next and kin)"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError(f"{model_path}: several vision feature layers are not supported")
        family = sys.modules[AutoModelForImageTextToText._model_mapping[type(config)].__module__]
        projector_class = next(getattr(family, n) for n in dir(family) if n.endswith("MultiModalProjector"))
        with no_init_weights():  # every weight is loaded below, strictly
            tower, projector = AutoModel.from_config(config.vision_config), projector_class(config)
        parts = read_weights(Path(model_path), ("vision_tower", "multi_modal_projector"), dtype)
        # assign: the modules take the loaded tensors as they are, no second copy of the weights
        tower.load_state_dict(_match_keys(parts["vision_tower"], tower.state_dict().keys()), strict=True, assign=True)
        projector.load_state_dict(parts["multi_modal_projector"], strict=True, assign=True)
        try:
            processor = AutoImageProcessor.from_pretrained(model_path)
            normalization = (list(processor.image_mean), list(processor.image_std))
        except (OSError, ValueError):  # a checkpoint saved without its processor: photometric training refuses it
            normalization = None
        return cls(
            tower.to(dtype).eval(),
            projector.to(dtype).eval(),
            config.vision_feature_layer,
            config.vision_feature_select_strategy == "default",
            normalization,
        )

    def use_layer(self, layer: int) -> None:
        """Read hidden layer `layer` of the tower (an index into its hidden states: 0 the patch embeddings (a
        convolutional tower's stem), -1 the last)."""
        widths = None
        if self._convolutional and layer != -1:  # its stem and stages, whose widths differ, seen on a small image
            training = self.training
            self.eval()  # no batch statistics moved
            with torch.no_grad():
                widths = [h.shape[1] for h in self._hidden_states(torch.zeros(1, 3, 64, 64))]
            self.train(training)
            states = len(widths)
        else:  # a ViT's layers after its patch embeddings; a convolutional tower's last map (FastVLM's own reading)
            states = getattr(self.vision_tower.config, "num_hidden_layers", 0) + 1
        if not -states <= layer < states:
            raise ValueError(f"feature layer {layer}: the tower has {states} hidden states, {-states} to {states - 1}")
        if widths is not None and widths[layer] != self.projector.linear_1.in_features:
            raise ValueError(
                f"feature layer {layer}: that stage of the convolutional tower has {widths[layer]} channels, the "
                f"projector reads {self.projector.linear_1.in_features} (its last stage's)"
            )
        self.feature_layer = layer

    def train(self, mode: bool = True) -> ImageEmbedder:
        """Batch norms whose weights are frozen stay in eval mode: training the rest (a projector, LoRA) must not
        move a frozen tower's running statistics, which no checkpoint of the trained weights would keep."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    @property
    def dim(self) -> int:
        return int(self.projector.linear_2.out_features)

    @property
    def _convolutional(self) -> bool:
        """A tower without transformer layers (FastVLM's): its tokens are the places of a feature map."""
        return not hasattr(self.vision_tower.config, "num_hidden_layers")

    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A ViT at another size than it was trained at: its position embeddings, interpolated. A convolutional
        # tower has none to interpolate.
        resized = {}
        if hasattr(self.vision_tower.config, "image_size") and pixel_values.shape[-1] != self.vision_tower.config.image_size:
            resized = {"interpolate_pos_encoding": True}
        return self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **resized).hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._convolutional and self.feature_layer == -1:  # FastVLM's own reading: the tower's last feature map
            tokens = self.vision_tower(pixel_values, return_dict=True).last_hidden_state
        else:
            tokens = self._hidden_states(pixel_values)[self.feature_layer]
        if tokens.dim() == 4:  # a convolutional tower's feature map [B, C, H, W]: H x W tokens of width C
            tokens = tokens.flatten(2).transpose(1, 2)
        if self.drop_cls:
            tokens = tokens[:, 1:]
        return self.projector(tokens).mean(dim=1)


def read_weights(folder: Path, parts: Sequence[str], dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """{part: its weights, named within the part} for top-level modules `parts` of a checkpoint, read
    tensor by tensor from its safetensors files (only the shards that hold them). Checkpoints name the
    parts at the top (`vision_tower.`: llava-hf on the hub) or under `model.` (transformers 5)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"{folder} holds no safetensors weights (model.safetensors or its index)")

    def part_of(key: str) -> tuple[str, str] | None:
        bare = key.removeprefix("model.")
        for part in parts:
            if bare.startswith(f"{part}."):
                return part, bare[len(part) + 1 :]
        return None

    out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in parts}
    wanted = {key: part_of(key) for key in weight_map}
    for file in sorted({weight_map[k] for k, where in wanted.items() if where}):
        with safe_open(folder / file, framework="pt") as f:
            for key in f.keys():
                if where := wanted.get(key):
                    out[where[0]][where[1]] = f.get_tensor(key).to(dtype)
    empty = [part for part, weights in out.items() if not weights]
    if empty:
        raise ValueError(f"{folder}: no weights for {empty} in its safetensors files")
    return out


def _match_keys(weights: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tower weights under the module's own names: hub checkpoints nest a CLIP tower's weights in
    `vision_model.`, transformers 5 modules do not (or the other way round)."""
    expected = set(expected)
    out = {}
    for key, tensor in weights.items():
        candidates = (key, key.removeprefix("vision_model."), f"vision_model.{key}")
        out[next((c for c in candidates if c in expected), key)] = tensor
    return out
