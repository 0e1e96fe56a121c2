"""The NF4 state as rows of whole quantization blocks: the layout in which FSDP2 shards a 4-bit weight.

FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every *parameter* of a unit along dim 0 between the ranks
and all-gathers it just before the unit runs; *buffers* it leaves whole on every rank. And its
``MixedPrecisionPolicy(param_dtype=...)`` casts every floating parameter it gathers, frozen or not; only
non-floating ones are left alone (``FSDPParam.init_dtype_attrs`` in torch/distributed/fsdp/_fully_shard/
_fsdp_param.py). A 4-bit weight held in flat buffers (``NF4Weight``'s layout, the checkpoint format) is
therefore copied whole to every rank. Held as frozen uint8 parameters with one row per quantization block,

    field            flat (NF4Weight, checkpoints)        block layout (sharded)
    codes            ((numel + 1) // 2,) uint8       →    (n_blocks, blocksize / 2) uint8   zero-padded
    absmax           (n_blocks,) fp32                →    (n_blocks, 4) uint8               its bytes
    absmax_codes     (n_blocks,) uint8                    (n_blocks,) uint8                 as it is
    absmax_scale     (n_scales,) fp32                →    (n_scales, 4) uint8               its bytes
    absmax_offset    () fp32                              () fp32, a buffer                 one number

a dim-0 shard holds whole blocks with their statistics: ceil(n_blocks / N) of them per rank, ≈ 1/N of the
weight. The fp32 statistics travel as their raw bytes, so no ``param_dtype`` can round them (an absmax rounded
to bf16 would move every weight of its block); ``.view(torch.float32)`` reads back the same bits. The offset
is one number per layer: FSDP2 cannot split a 0-dim tensor, and 4 bytes need no sharding.

Worked example: GPT-2's c_attn (768 → 2304) at blocksize 64 with double quantization has 27,648 blocks: codes
(27648, 32), absmax codes (27648,), scales (108, 4). On 2 ranks each holds 13,824 blocks: 442,368 + 13,824
bytes, 54 scales (216 bytes) and the offset (4), instead of all 912,820 bytes.

QLoRA: https://arxiv.org/abs/2305.14314; FSDP: Zhao et al. 2023, https://arxiv.org/abs/2304.11277.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SHARDED_FIELDS", "to_blocks", "from_blocks"]

SHARDED_FIELDS = ("codes", "absmax", "absmax_codes", "absmax_scale")  # absmax_offset stays a buffer
_HELD_AS_BYTES = ("absmax", "absmax_scale")  # fp32: uint8 rows of 4 bytes, out of any param_dtype's reach


def to_blocks(name: str, flat: torch.Tensor, numel: int, blocksize: int) -> torch.Tensor:
    """The ``NF4Weight`` field ``name`` of a ``numel``-weight state, from its flat layout to the block layout.

    A view of ``flat`` where no padding is needed (the codes of a weight that fills its last block, the
    statistics), else a copy. Works on meta tensors (shapes only), which is how a layer learns the block
    shapes it must accept.
    """
    if name == "codes":
        n_blocks, row = -(-numel // blocksize), blocksize // 2
        return F.pad(flat, (0, n_blocks * row - flat.numel())).view(n_blocks, row)  # (n_blocks, blocksize/2)
    if name in _HELD_AS_BYTES:
        return flat.view(torch.uint8).view(-1, 4)  # (n, 4): the bits of n fp32 values
    return flat


def from_blocks(name: str, held: torch.Tensor, numel: int) -> torch.Tensor:
    """``to_blocks`` undone, as a view (no copy: forward calls this for every layer on every step)."""
    if name == "codes":
        return held.reshape(-1)[: (numel + 1) // 2]  # ((numel + 1) // 2,), the padding dropped
    if name in _HELD_AS_BYTES:
        return held.view(torch.float32).view(-1)  # (n, 4) uint8 → (n, 1) fp32 → (n,)
    return held
