"""Numeric precision by device: one policy for training and embedding extraction.

``precision.resolve(requested, device)`` looks at the device and returns a :class:`Precision`, which
the training loop and the extractor use for their forward passes (``with prec.autocast(): ...``)
and, in training, for the backward pass and the optimiser step (gradient scaling).

The policy (``requested="auto"``, the default):

====================================  ===================================  =====================
device                                precision                            examples
====================================  ===================================  =====================
GPU, compute capability 8.0 and up    bf16 autocast, TF32 matmuls          A100, A10, L4, RTX
                                                                           30xx/40xx, H100
GPU, compute capability 7.x           fp16 autocast + gradient scaler      T4 (Colab), V100,
                                                                           RTX 20xx
GPU, compute capability below 7.0     fp32                                 P100, GTX 10xx
CPU (and any other device)            fp32                                 -
====================================  ===================================  =====================

Why: bf16 keeps fp32's range, so it needs no loss scaling, but only GPUs from compute capability 8.0
(Ampere) compute it natively. Older GPUs emulate it without tensor cores, and PyTorch's fused
attention kernels refuse bf16 there, so attention falls back to the slow kernel that stores the whole
attention matrix. On 7.x GPUs fp16 runs on tensor cores; its narrow range needs a gradient scaler
(the loss is multiplied by a large factor before ``backward`` so small gradients do not underflow;
a step whose gradients overflowed to inf/NaN is skipped and the factor halved). GPUs before 7.0
have no tensor cores (and consumer Pascal cards run fp16 at a small fraction of their fp32 rate),
so they stay in fp32. Parts that need fp32 keep it under autocast: the fbank front-ends and the
margin losses' cosines disable autocast for themselves.

TF32 (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``): the
policy turns it on for GPUs from compute capability 8.0 (fp32 matmuls outside autocast then use
tensor cores with a 10-bit mantissa, like PyTorch's own cuDNN default) and off on older GPUs,
where it does not exist; ``tf32=False`` keeps full fp32 matmuls. The flags are process-wide and
only touched when the device is a GPU.

Forcing a precision (``"bf16"``, ``"fp16"``, ``"fp32"``):

- ``fp32`` is always honoured;
- ``bf16`` on a GPU before compute capability 8.0 runs (emulated) with a warning that it is slow
  and that ``auto`` picks fp16 there; ``bf16`` on the CPU runs (CPU autocast supports it; it is fast
  only on CPUs with AMX or AVX512-BF16);
- ``fp16`` on a GPU runs with a gradient scaler (also on 8.0+, where bf16 is the better choice);
  ``fp16`` on the CPU is refused: most CPUs convert fp16 to fp32 per operation, so it is slower than
  fp32 and needs a gradient scaler for nothing;
- a GPU asked for (``device="cuda"``) where torch sees none is an error naming the device asked for;
- other devices (``mps``, ...) run in fp32; forcing bf16/fp16 there is refused.

Gradient checkpointing (``use_gradient_checkpointing``): recomputing each block's activations in the
backward pass instead of storing them costs about a third more compute and saves most activation
memory. The rule: on by default when a release-size backbone (at least 50 M parameters: BEATs
iter3, EAT-base/-large; FISHER-small has 22 M) trains on crops of 10 s or longer on a GPU of less
than 24 GB (torch reports under 21 GiB: T4 and V100 16 GB, RTX 4080, 20-GB cards; the 24-GB cards
L4, A10 and RTX 3090/4090 report 22-24 GiB and train without it); off on the CPU. ``True`` or
``False`` overrides the rule.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16 = (8, 0)  # Ampere: bf16 and TF32 tensor cores
TENSOR_CORES = (7, 0)  # Volta: fp16 tensor cores

# The gradient-checkpointing rule (see the module docstring).
CHECKPOINTING_BELOW_GIB = 21.0  # a card sold as 24 GB reports 22-24 GiB; 16/20-GB cards report < 20
RELEASE_SIZE_PARAMETERS = 50_000_000
CHECKPOINTING_FROM_SECONDS = 10.0


class PrecisionError(ValueError):
    """A precision or device request that this machine cannot honour."""


class GradientOverflowError(FloatingPointError):
    """Optimiser steps were skipped one after another because the gradients were inf or NaN."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the policy needs to know about a device. ``probe`` reads it from torch; tests (and
    planning for a GPU one does not have) build it by hand: ``DeviceFacts("cuda", (7, 5), 15.0, "T4")``.

    ``memory_gb`` is the total memory as torch reports it, in GiB (``total_memory / 2**30``)."""

    type: str
    capability: tuple[int, int] | None = None
    memory_gb: float | None = None
    name: str = ""
    index: int | None = None

    def __post_init__(self) -> None:
        if self.type == "cuda" and self.capability is None:
            raise ValueError("DeviceFacts for a 'cuda' device need its compute capability, e.g. (7, 5)")

    @property
    def is_gpu(self) -> bool:
        return self.type == "cuda"

    @property
    def native_bf16(self) -> bool:
        return self.is_gpu and tuple(self.capability) >= NATIVE_BF16

    @property
    def tensor_cores(self) -> bool:
        return self.is_gpu and tuple(self.capability) >= TENSOR_CORES

    def describe(self) -> str:
        if not self.is_gpu:
            return self.type if not self.name else f"{self.type} ({self.name})"
        major, minor = self.capability
        memory = f", {self.memory_gb:.1f} GiB" if self.memory_gb is not None else ""
        where = f"cuda:{self.index}" if self.index is not None else "cuda"
        return f"{where} ({self.name or 'GPU'}, compute capability {major}.{minor}{memory})"

    @classmethod
    def probe(cls, device: str | torch.device | None = None) -> DeviceFacts:
        """The facts of ``device`` (default: the current GPU if torch sees one, else the CPU).
        Asking for a GPU that is not there raises ``PrecisionError`` naming what was asked for."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        asked = str(device)
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device.type, name=platform.processor() if device.type == "cpu" else "")
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise PrecisionError(
                f"device {asked!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__}, "
                f"{build}): use device='cpu', or run where a GPU is visible"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise PrecisionError(
                f"device {asked!r} was asked for but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})"
                + (f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
            )
        props = torch.cuda.get_device_properties(index)
        return cls("cuda", (props.major, props.minor), props.total_memory / 2**30, props.name, index)


def choose_precision(requested: str | None, facts: DeviceFacts) -> tuple[str, str]:
    """The policy itself: ``(mode, reason)`` with ``mode`` in bf16 / fp16 / fp32 for ``requested``
    ("auto", "bf16", "fp16", "fp32"; None = "auto") on the device ``facts`` describe.
    Raises ``PrecisionError`` for a request the device cannot honour (fp16 on the CPU)."""
    requested = "auto" if requested is None else requested
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    where = facts.describe()
    if requested == "fp32":
        return "fp32", "asked for"
    if facts.is_gpu:
        capability = "{}.{}".format(*facts.capability)
        if requested == "auto":
            if facts.native_bf16:
                return "bf16", f"auto: native bf16 from compute capability 8.0 ({capability})"
            if facts.tensor_cores:
                return "fp16", f"auto: no native bf16 before compute capability 8.0 ({capability})"
            return "fp32", f"auto: no tensor cores before compute capability 7.0 ({capability})"
        if requested == "bf16" and not facts.native_bf16:
            warnings.warn(
                f"bf16 was asked for on {where}, which has no native bf16 (it needs compute capability "
                "8.0): it is emulated without tensor cores and attention falls back to its slow kernel. "
                "precision='auto' picks fp16 with a gradient scaler on this GPU.",
                stacklevel=3,
            )
            return "bf16", f"asked for (emulated: no native bf16 at compute capability {capability})"
        return requested, "asked for"
    if facts.type != "cpu":
        if requested == "auto":
            return "fp32", f"auto: mixed precision is only set up for CUDA GPUs, not {facts.type}"
        raise PrecisionError(
            f"{requested} was asked for on device {facts.type!r}: the toolkit runs mixed precision on "
            "CUDA GPUs (and bf16 on the CPU) only; use precision='fp32' (or 'auto')"
        )
    if requested == "auto":
        return "fp32", "auto: the CPU trains in fp32"
    if requested == "fp16":
        raise PrecisionError(
            "fp16 was asked for on the CPU: most CPUs convert fp16 to fp32 for every operation, so it is "
            "slower than fp32 and would need a gradient scaler for nothing. Use precision='fp32' (the "
            "CPU default) or 'bf16' (fast on CPUs with AMX or AVX512-BF16), or a GPU for fp16."
        )
    return "bf16", "asked for (CPU bf16 autocast: fast only on CPUs with AMX or AVX512-BF16)"


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on GPUs from compute capability 8.0 (process-wide)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


class Precision:
    """How forward passes run and how gradients are stepped; built by ``resolve`` (the policy).

    Constructing one directly applies no policy check (tests use ``Precision("fp16", "cpu")`` to run
    the gradient-scaler path on a CPU). A training step::

        with prec.autocast():                  # the forward pass only
            loss = model(batch)
        prec.scale(loss / accum).backward()   # backward outside autocast
        prec.unscale_(optimizer)              # true gradients, before clipping
        clip_grad_norm_(params, 5.0)
        stepped = prec.step(optimizer)        # False: skipped (fp16 overflow); raises when repeated

    ``step`` raises ``GradientOverflowError`` (with advice) after ``max_consecutive_skips`` skipped
    steps in a row (None: never). A few skips at the start of fp16 training are normal: the scaler
    starts at ``init_scale`` = 2**16 and halves until the gradients fit.
    """

    def __init__(
        self,
        mode: str,
        device_type: str = "cpu",
        *,
        facts: DeviceFacts | None = None,
        tf32: bool = False,
        reason: str = "",
        max_consecutive_skips: int | None = 25,
        init_scale: float = 2.0**16,
    ):
        if mode not in DTYPES:
            raise PrecisionError(f"unknown precision mode {mode!r}: expected one of {', '.join(DTYPES)}")
        self.mode = mode
        self.device_type = device_type
        self.facts = facts if facts is not None else DeviceFacts(device_type, capability=None)
        self.tf32 = tf32
        self.reason = reason
        self.max_consecutive_skips = max_consecutive_skips
        self.init_scale = init_scale
        self.skipped_steps = 0
        self.consecutive_skips = 0

    @property
    def dtype(self) -> torch.dtype:
        """The autocast compute dtype (float32: no autocast)."""
        return DTYPES[self.mode]

    @property
    def uses_scaler(self) -> bool:
        return self.mode == "fp16"

    @functools.cached_property
    def scaler(self) -> torch.amp.GradScaler:
        """A ``torch.amp.GradScaler``, enabled for fp16 only (disabled: ``scale`` returns the loss,
        ``step`` is ``optimizer.step()``). Built on first use."""
        device = self.device_type if self.device_type in ("cuda", "cpu") else "cpu"
        return torch.amp.GradScaler(device, init_scale=self.init_scale, enabled=self.uses_scaler)

    def autocast(self):
        """The context for forward passes: autocast to bf16/fp16, or autocast explicitly off in fp32
        (so an outer autocast cannot lower the precision). Run ``backward()`` outside it."""
        if self.mode == "fp32":
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward()`` on (multiplied by the scaler's factor in fp16)."""
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scaler's factor in place (once per step, before clipping)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` through the scaler, then the scaler's update. Returns False when the
        step was skipped because a gradient was inf/NaN (fp16 only: the weights and the optimiser
        state are unchanged and the scale is halved). Raises ``GradientOverflowError`` after
        ``max_consecutive_skips`` skipped steps in a row."""
        if not self.scaler.is_enabled():
            optimizer.step()
            self.consecutive_skips = 0
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < before  # the scaler backs off exactly when it skips
        self.skipped_steps += int(skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            raise GradientOverflowError(self.overflow_advice())
        return not skipped

    def overflow_advice(self) -> str:
        """What to tell a user whose fp16 steps keep overflowing."""
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        return (
            f"{self.consecutive_skips} optimiser steps in a row were skipped because the {self.mode} "
            f"gradients overflowed to inf/NaN, although the gradient scaler lowered its scale to {scale:g}: "
            "training is diverging, not just calibrating the scale. Try a lower learning rate (lr, and "
            "head_lr_scale for the head), a longer warm-up, gradient clipping, or precision='fp32' "
            "(or 'bf16' on a GPU of compute capability 8.0+, whose range does not overflow)."
        )

    def state_dict(self) -> dict:
        """For checkpoints: the mode and the scaler's state (its scale), so a resumed fp16 run goes on
        with the scale it had reached."""
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.uses_scaler else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; a checkpoint of another mode (resumed on another GPU) keeps this
        run's fresh scaler, since the scale of one mode means nothing to another."""
        if self.uses_scaler and state.get("mode") == "fp16" and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def describe(self) -> str:
        """One line for logs: what runs, where and why."""
        what = {
            "bf16": "bf16 autocast",
            "fp16": "fp16 autocast + gradient scaler",
            "fp32": "fp32",
        }[self.mode]
        parts = [f"{what} on {self.facts.describe()}"]
        if self.reason:
            parts.append(self.reason)
        if self.facts.is_gpu:
            parts.append("TF32 matmuls on" if self.tf32 else "TF32 off")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Precision({self.describe()})"


def resolve(
    requested: str | None = "auto",
    device: str | torch.device | None = None,
    *,
    facts: DeviceFacts | None = None,
    tf32: bool | None = None,
    max_consecutive_skips: int | None = 25,
) -> Precision:
    """Apply the policy for ``device`` (probed) or for given ``facts`` (injected), set the TF32
    flags when the device is a GPU (``tf32=None``: on from compute capability 8.0), and return the
    ``Precision`` to train or extract with."""
    facts = facts if facts is not None else DeviceFacts.probe(device)
    mode, reason = choose_precision(requested, facts)
    use_tf32 = False
    if facts.is_gpu:
        use_tf32 = facts.native_bf16 if tf32 is None else bool(tf32) and facts.native_bf16
        set_tf32(use_tf32)
    return Precision(
        mode,
        facts.type,
        facts=facts,
        tf32=use_tf32,
        reason=reason,
        max_consecutive_skips=max_consecutive_skips,
    )


def use_gradient_checkpointing(
    requested: bool | None,
    facts: DeviceFacts,
    *,
    parameters: int,
    crop_seconds: float | None,
) -> bool:
    """The gradient-checkpointing rule: ``requested`` True/False is kept as is; None (auto) turns it
    on for a backbone of at least ``RELEASE_SIZE_PARAMETERS`` parameters (``kit.models.count_parameters``)
    training on crops of at least ``CHECKPOINTING_FROM_SECONDS`` on a GPU reporting less than
    ``CHECKPOINTING_BELOW_GIB`` of memory (a card of less than 24 GB). ``crop_seconds`` None means
    whole clips of unknown length (taken as long)."""
    if requested is not None:
        if not isinstance(requested, bool):
            raise ValueError(f"gradient_checkpointing must be True, False or None (auto), got {requested!r}")
        return requested
    if not facts.is_gpu or facts.memory_gb is None:  # the CPU (or a GPU of unknown memory): off
        return False
    long_crops = crop_seconds is None or crop_seconds >= CHECKPOINTING_FROM_SECONDS
    return bool(
        parameters >= RELEASE_SIZE_PARAMETERS and long_crops and facts.memory_gb < CHECKPOINTING_BELOW_GIB
    )


__all__ = [
    "PRECISIONS",
    "DeviceFacts",
    "GradientOverflowError",
    "Precision",
    "PrecisionError",
    "choose_precision",
    "resolve",
    "set_tf32",
    "use_gradient_checkpointing",
]
