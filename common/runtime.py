"""Devices, mixed precision, seeding and random-number state for resumable runs."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import random
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class DeviceError(ValueError):
    """A device or precision this machine cannot provide."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes cuda, then mps, then cpu; any other name is used as given. A CPU run also keeps freed memory
    for reuse (reuse_freed_memory)."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but CUDA is not available on this machine; "
                              "use --device=auto or --device=cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        reuse_freed_memory()
    return device


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of any size for the next allocation. By default it returns every block
    above 32 MB to the system and page-faults a fresh one in at the next request: a 256 px feature map of 64
    channels (67 MB at batch 4) then costs more to allocate than a SiLU costs to compute, and decoding runs ~20%
    slower. The price: the process keeps its peak memory instead of shrinking after it. True if applied (Linux,
    glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


@dataclass(frozen=True)
class Precision:
    """The autocast dtype chosen for a device (None = full fp32)."""

    device: torch.device
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only; a disabled scaler is a transparent pass-through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)


def strict_fp32(device: torch.device) -> None:
    """Turn cuDNN's TF32 (on by default) off on CUDA, so that fp32 convolutions are fp32. Where this code promises
    fp32 (the phi convolutions, an fp32 encoder, the Inception features) a 10-bit mantissa would flip nearest-code
    choices and shift features, and results would differ between GPU models and from the CPU. Matmuls already
    default to full fp32; autocast's bf16/fp16 convolutions are not affected."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False


def select_precision(device: torch.device, name: str = "auto") -> Precision:
    """'auto': bf16 on CUDA cards with bf16 tensor cores, fp16 on older CUDA cards and MPS, fp32 on CPU.
    Also makes fp32 strict (see strict_fp32)."""
    if name not in ("auto", *_DTYPES):
        raise DeviceError(f"precision {name!r} is not one of auto, {', '.join(_DTYPES)}")
    strict_fp32(device)
    if device.type == "cuda":
        # Emulated bf16 (pre-Ampere) has no tensor cores and no flash/memory-efficient attention: slow and memory-hungry.
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if name == "auto":
            name = "bf16" if native_bf16 else "fp16"
        elif name == "bf16" and not native_bf16:
            major, minor = torch.cuda.get_device_capability(device)
            raise DeviceError(f"precision 'bf16' on {torch.cuda.get_device_name(device)} (compute capability "
                              f"{major}.{minor}): bf16 needs 8.0 or newer and would only be emulated here; "
                              "use --precision=auto (fp16 with loss scaling on this card) or fp16")
    elif name == "auto":
        name = "fp16" if device.type == "mps" else "fp32"
    return Precision(device, _DTYPES[name])


def make_deterministic() -> None:
    """Deterministic CUDA kernels where torch has them (slower); ops without one warn instead of failing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility needs a fixed workspace
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random-number state as tensors and plain values, so it survives weights_only loading."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's own device only: a resumed run may see fewer GPUs (another world size, CUDA_VISIBLE_DEVICES).
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())
