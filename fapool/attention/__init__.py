"""Ray-free attention: kernels that return the log-sum-exp, and the pool's exact split math."""

from __future__ import annotations

from fapool.attention.base import AttentionKernel
from fapool.attention.kernels import (
    KERNELS,
    FlashAttn2Kernel,
    FlashAttn4Kernel,
    ReferenceKernel,
    SdpaCudnnKernel,
    available_kernels,
    select_kernel,
)
from fapool.attention.merge import causal_by_diagonal, merge, merge_stacked, merge_tree
from fapool.attention.split import (
    decode_partial,
    kv_shards,
    prefill_block,
    query_blocks,
    shard_partial,
    split_decode,
    split_prefill,
)

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "FlashAttn2Kernel",
    "FlashAttn4Kernel",
    "ReferenceKernel",
    "SdpaCudnnKernel",
    "available_kernels",
    "causal_by_diagonal",
    "decode_partial",
    "kv_shards",
    "merge",
    "merge_stacked",
    "merge_tree",
    "prefill_block",
    "query_blocks",
    "select_kernel",
    "shard_partial",
    "split_decode",
    "split_prefill",
]
