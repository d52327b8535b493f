"""The training step's pure core: mixed precision, accumulation, clipping, gradient checkpointing."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from dermaray.config import ModelsConfig
from dermaray.grounding.model import GroundingModel, GroundingSettings, loss_fn
from dermaray.models import resolve_model
from dermaray.optimizer_step import OptimizerStep, cast_frozen, enable_gradient_checkpointing, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ModelsConfig:
    return ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("models")))


def _regression(seed: int = 0, n: int = 16) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x = torch.randn(n, 8)
    return model, x, torch.randn(n, 2)


def test_the_config_offers_exactly_the_precisions_the_step_knows() -> None:
    from typing import get_args

    from dermaray.config import TrainConfig
    from dermaray.optimizer_step import COMPUTE_DTYPES

    assert set(get_args(TrainConfig.model_fields["precision"].annotation)) == {"auto", *COMPUTE_DTYPES}


def test_auto_precision_is_fp32_on_cpu_and_names_are_checked() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16-mixed", CPU) == "bf16-mixed"
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp8", CPU)


def test_accumulating_four_micro_batches_steps_as_one_batch_four_times_as_large() -> None:
    one, x, y = _regression()
    accumulated, _, _ = _regression()
    for model, chunks, accumulation in ((one, 1, 1), (accumulated, 4, 4)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        step = OptimizerStep(model.parameters(), optimizer, "fp32", "cpu", accumulation=accumulation)
        taken = [
            step.backward(torch.nn.functional.mse_loss(model(xc), yc))
            for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True)
        ]
        assert [t is not None for t in taken] == [False] * (chunks - 1) + [True]
    for a, b in zip(one.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_partial_accumulation_at_the_end_of_an_epoch_is_weighted_as_a_whole_batch() -> None:
    one, x, y = _regression(n=8)
    flushed, _, _ = _regression(n=8)
    for model, chunks, accumulation in ((one, 1, 1), (flushed, 2, 4)):  # 2 of 4 micro-batches, then the epoch ends
        step = OptimizerStep(
            model.parameters(), torch.optim.SGD(model.parameters(), lr=0.5), "fp32", "cpu", accumulation=accumulation
        )
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            step.backward(torch.nn.functional.mse_loss(model(xc), yc))
        step.flush()
        assert step.pending == 0 and step.flush() is None
    for a, b in zip(one.parameters(), flushed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_clipping_bounds_the_gradient_norm_of_the_step() -> None:
    model, x, y = _regression()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    # Plain SGD with lr 1: the parameter change is exactly the (clipped) gradient.
    step = OptimizerStep(model.parameters(), torch.optim.SGD(model.parameters(), lr=1.0), "fp32", "cpu", max_grad_norm=0.05)
    norm = step.backward(100 * torch.nn.functional.mse_loss(model(x), y))
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert norm is not None and norm > 1.0  # the raw gradient was large ...
    assert float(moved.norm()) == pytest.approx(0.05, rel=1e-4)  # ... and the step is clipped to 0.05


def test_fp16_mixed_scales_the_loss_and_still_steps_like_fp32() -> None:
    fp32, x, y = _regression()
    fp16, _, _ = _regression()
    for model, precision in ((fp32, "fp32"), (fp16, "fp16-mixed")):
        step = OptimizerStep(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), precision, "cpu")
        for _ in range(5):
            with step.autocast():
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            step.backward(loss)
        if precision == "fp16-mixed":
            assert step.scaler.is_enabled() and step.state_dict()["scaler"]["scale"] > 1
    for a, b in zip(fp32.parameters(), fp16.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-2)


def _train_grounding(models: ModelsConfig, precision: str, steps: int = 30) -> tuple[list[float], GroundingModel]:
    """LoRA grounding of the tiny LLaVA on images whose target is their mean brightness."""
    resolve_model("grounding_mllm", "tiny", models)  # built before seeding: building draws from torch's RNG
    torch.manual_seed(0)
    model = GroundingModel.from_settings(GroundingSettings(model="tiny", attributes=["area_mm2"], tune="lora"), models)
    cast_frozen(model, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    step = OptimizerStep(params, optimizer, precision, "cpu", max_grad_norm=1.0)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        pixels = torch.rand(16, 3, 64, 64, generator=generator) * torch.rand(16, 1, 1, 1, generator=generator) * 2 - 1
        target = (pixels.mean(dim=(1, 2, 3)) * 4).unsqueeze(1)
        with step.autocast():
            loss = loss_fn(model(pixels)["attributes"].float(), target)
        step.backward(loss)
        losses.append(float(loss.detach()))
    return losses, model


def test_bf16_mixed_grounding_on_cpu_learns_as_fp32_does_with_frozen_weights_in_bfloat16(models: ModelsConfig) -> None:
    fp32, _ = _train_grounding(models, "fp32")
    bf16, model = _train_grounding(models, "bf16-mixed")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(dtypes[n] == torch.bfloat16 for n in frozen)
    # Both learn (the last ten steps' loss is well under the first ten's), and end within 0.05
    # (z units; the starting loss is about 1) of each other: bfloat16 has 8 bits of mantissa.
    for losses in (fp32, bf16):
        assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert abs(np.mean(fp32[-10:]) - np.mean(bf16[-10:])) < 0.05


def test_gradient_checkpointing_gives_the_same_gradients(models: ModelsConfig) -> None:
    resolve_model("grounding_mllm", "tiny", models)  # built first: building draws from torch's RNG
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GroundingModel.from_settings(GroundingSettings(model="tiny", attributes=["area_mm2"], tune="lora"), models)
        if checkpointing:
            assert enable_gradient_checkpointing(model) == ["embedder.vision_tower"]
        model.train()
        pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        model(pixels)["attributes"].square().mean().backward()
        # Trainable weights above the layer the embedding reads get no gradient, with or without.
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any("lora_" in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_on_a_model_without_support_is_an_error() -> None:
    with pytest.raises(ValueError, match="supports gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_bf16_mixed_diffusion_lora_step_keeps_the_frozen_pipeline_in_bfloat16(models: ModelsConfig) -> None:
    from dermaray.diffusion.pipeline import DiffusionObjective, add_lora, encode_latents, load_pipeline

    pipe = load_pipeline(resolve_model("diffusion_base", "tiny", models))
    add_lora(pipe.unet, rank=4)
    objective = cast_frozen(DiffusionObjective(pipe, "lora"), "bf16-mixed")
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    params = [p for p in objective.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # the LoRA weights
    assert enable_gradient_checkpointing(objective) == ["unet"]  # the frozen VAE and text encoder keep no activations
    step = OptimizerStep(params, torch.optim.AdamW(params, lr=1e-3), "bf16-mixed", "cpu", max_grad_norm=1.0)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posteriors = encode_latents(pipe.vae, pixels)
    with step.autocast():
        loss = objective(posteriors, ["a dermoscopic photo of melanoma"] * 2, torch.Generator().manual_seed(1))["loss"]
    before = [p.detach().clone() for p in params]
    norm = step.backward(loss)
    assert torch.isfinite(loss) and norm is not None and norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("tune, targets", [("projector", None), ("lora", ["convolution"])])
def test_a_frozen_convolutional_tower_runs_in_bf16_mixed_with_its_batch_norms_in_float32(
    models: ModelsConfig, tune: str, targets: list[str] | None
) -> None:
    """F.batch_norm takes its weights and running statistics in one dtype: a frozen batch norm cast to bfloat16
    beside its float32 statistics fails ("expected scalar type BFloat16 but found Float")."""
    lora = {"lora_targets": targets} if targets else {}
    model = GroundingModel.from_settings(GroundingSettings(model="tiny-conv", attributes=["area_mm2"], tune=tune, **lora), models)
    cast_frozen(model, "bf16-mixed")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {dtypes[n] for n in dtypes if ".normalization." in n} == {torch.float32}
    frozen_convolutions = {dtypes[n] for n in dtypes if ".convolution." in n and "lora_" not in n}
    assert frozen_convolutions == {torch.bfloat16}
    params = [p for p in model.parameters() if p.requires_grad]
    step = OptimizerStep(params, torch.optim.AdamW(params, lr=1e-3), "bf16-mixed", "cpu")
    with step.autocast():
        loss = loss_fn(model.train()(torch.rand(4, 3, 128, 128))["attributes"].float(), torch.zeros(4, 1))
    step.backward(loss)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad) and torch.isfinite(loss)
