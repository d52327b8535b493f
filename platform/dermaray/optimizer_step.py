"""One optimizer step as GPU training does it: mixed precision, gradient accumulation, clipping.

The pure core of the training loop (no Ray): `jobs.training` runs it on every Ray Train worker,
and tests and `benchmarks/gpu_check.py` run it as it is.

    precision = resolve_precision("auto", device)   # bf16-mixed on a bfloat16 GPU, fp32 on CPU
    cast_frozen(model, precision)                   # frozen weights in the compute dtype
    step = OptimizerStep(params, optimizer, precision, device.type, max_grad_norm=1.0, accumulation=4)
    for batch in batches:
        with step.autocast():
            loss = loss_of(model, batch)
        if step.backward(loss) is not None:         # an optimizer step was taken (every 4th micro-batch)
            schedule.step()
    step.flush()                                    # the epoch's last, partial accumulation
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

# The precisions besides "auto" (TrainConfig.precision spells the same names for the config schema).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto": bf16-mixed on a GPU that has bfloat16, fp16-mixed on an older GPU, fp32 on CPU
    (CPUs without AMX run bfloat16 matmuls slower than float32)."""
    if precision != "auto":
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"precision must be auto, {', '.join(COMPUTE_DTYPES)}; got {precision!r}")
        if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16: use precision fp16-mixed (or auto)")
        return precision
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
    return "fp32"


def cast_frozen(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Frozen weights in the compute dtype, trainable ones in float32 (diffusers' `cast_training_params`
    pattern): half the memory of the frozen part, and the optimizer still updates float32 weights."""
    dtype = COMPUTE_DTYPES[precision]
    # A batch norm's weights stay float32 beside its float32 running statistics (F.batch_norm takes one dtype for both).
    batch_norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        if p.requires_grad or id(p) in batch_norms:
            p.data = p.data.float()
        elif dtype is not None:
            p.data = p.data.to(dtype)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> list[str]:
    """Turn on activation recomputation in every Hugging Face (transformers or diffusers) model inside
    `model` that trains; the names of those modules. Frozen ones (a VAE, a text encoder) keep no
    activations anyway. An error when there is none: the setting would do nothing."""
    enabled: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{done}.") for done in enabled):
            continue  # inside a model already switched on
        if not any(p.requires_grad for p in module.parameters()):
            continue
        if hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing", False):
            # Non-reentrant: gradients reach trainable weights (LoRA) even when the inputs need none.
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            enabled.append(name)
        elif hasattr(module, "enable_gradient_checkpointing") and getattr(module, "_supports_gradient_checkpointing", False):
            module.enable_gradient_checkpointing()
            enabled.append(name)
    if not enabled:
        raise ValueError(f"{type(model).__name__} holds no model that supports gradient checkpointing")
    return enabled


class OptimizerStep:
    """Micro-batch backward passes and the optimizer steps they add up to.

    The loss of each micro-batch is divided by `accumulation`, so `accumulation` micro-batches of
    size b step exactly as one batch of size accumulation x b would (for a mean loss). fp16 scales
    the loss (GradScaler) so small gradients survive; the scaler skips a step whose gradients
    overflowed (its norm is then inf) and lowers the scale. Gradients are clipped to `max_grad_norm`
    after unscaling.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        precision: str,
        device_type: str,
        max_grad_norm: float | None = None,
        accumulation: int = 1,
    ):
        if accumulation < 1:
            raise ValueError(f"accumulation must be at least 1, got {accumulation}")
        self.params = list(params)
        self.optimizer = optimizer
        self.dtype = COMPUTE_DTYPES[precision]
        self.device_type = device_type
        self.max_grad_norm = max_grad_norm
        self.accumulation = accumulation
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16-mixed")
        self.pending = 0  # micro-batches whose gradients wait for the next step

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass (and evaluation) in the compute dtype; a no-op in fp32."""
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            yield

    def backward(self, loss: torch.Tensor) -> float | None:
        """Accumulate this micro-batch's gradients; step when `accumulation` are in. The gradient norm
        before clipping when a step was taken, else None."""
        self.scaler.scale(loss / self.accumulation).backward()
        self.pending += 1
        return self._step() if self.pending == self.accumulation else None

    def flush(self) -> float | None:
        """Step on a partial accumulation (an epoch's last micro-batches), weighted as a whole batch."""
        if not self.pending:
            return None
        for p in self.params:  # still scaled: scaling and this factor commute
            if p.grad is not None:
                p.grad.mul_(self.accumulation / self.pending)
        return self._step()

    def _step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        return float(norm)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
