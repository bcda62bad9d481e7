"""The attention kernels by name, and the choice of one for a device and dtype."""

from __future__ import annotations


import torch

from fapool.attention.base import HALF_DTYPES, AttentionKernel
from fapool.attention.flash import FlashAttn2Kernel, FlashAttn4Kernel
from fapool.attention.reference import ReferenceKernel
from fapool.attention.sdpa import SdpaCudnnKernel

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "FlashAttn2Kernel",
    "FlashAttn4Kernel",
    "ReferenceKernel",
    "SdpaCudnnKernel",
    "available_kernels",
    "select_kernel",
]

KERNELS: dict[str, type[AttentionKernel]] = {
    cls.name: cls for cls in (ReferenceKernel, SdpaCudnnKernel, FlashAttn4Kernel, FlashAttn2Kernel)
}
FLASH_NAMES = ("flash4", "flash2")


def available_kernels(device: torch.device | str) -> list[str]:
    """Names of the kernels that can run on ``device``."""
    device = torch.device(device)
    return [name for name, cls in KERNELS.items() if cls.unavailable_reason(device) is None]


def select_kernel(
    device: torch.device | str, name: str = "auto", dtype: torch.dtype | None = None
) -> AttentionKernel:
    """A kernel for ``device``: ``name`` is "auto" or one of :data:`KERNELS`.

    "auto" (`EngineConfig.attention_kernel`, `--attention-kernel`) picks
    flash4 on compute capability >= 9, flash2 on capability 8, when installed; otherwise sdpa
    on CUDA and reference elsewhere. Flash kernels take only fp16/bf16, so with
    ``dtype=torch.float32`` "auto" skips them and naming one is an error. A named kernel that
    cannot run raises ``ValueError`` saying why and what can.
    """
    device = torch.device(device)
    if name == "auto":
        return _auto(device, dtype)
    if name not in KERNELS:
        raise ValueError(
            f"unknown attention kernel {name!r}; choose one of {['auto', *KERNELS]}"
        )
    reason = KERNELS[name].unavailable_reason(device)
    if reason is None and name in FLASH_NAMES and dtype is not None and dtype not in HALF_DTYPES:
        reason = f"it takes float16 or bfloat16, not {dtype}"
    if reason is not None:
        usable = [n for n in available_kernels(device) if not _dtype_excludes(n, dtype)]
        raise ValueError(
            f"attention kernel {name!r} cannot run on {device}: {reason}. "
            f"Available here: {['auto', *usable]}"
        )
    return KERNELS[name]()


def _dtype_excludes(name: str, dtype: torch.dtype | None) -> bool:
    return name in FLASH_NAMES and dtype is not None and dtype not in HALF_DTYPES


def _auto(device: torch.device, dtype: torch.dtype | None) -> AttentionKernel:
    if device.type != "cuda" or not torch.cuda.is_available():
        return ReferenceKernel()
    major, _ = torch.cuda.get_device_capability(device)
    if not _dtype_excludes("flash4", dtype):
        if major >= 9 and FlashAttn4Kernel.is_available(device):
            return FlashAttn4Kernel()
        if major == 8 and FlashAttn2Kernel.is_available(device):
            return FlashAttn2Kernel()
    return SdpaCudnnKernel()
