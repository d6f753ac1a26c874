"""``flex``: torch's ``flex_attention`` with a block-diagonal (document) mask, compiled: CUDA, any dtype (the fp32
training backend on CUDA), no dropout. Its per-forward context is the ``BlockMask``, built once from the plan at the
level of 128 x 128 tiles, never as an N x N mask; the key bias is a score modifier in the kernel's float32 scores.
(It runs eagerly on the CPU without gradients, which the tests use to check its values.)"""

from __future__ import annotations

import torch

from ...core.packing import seq_index
from . import environment as env
from .base import AttentionContext, Backend

_COMPILED_FLEX = None
FLEX_BLOCK = 128  # flex_attention's default sparse block size


def flex_block_mask(seq: torch.Tensor, block: int = FLEX_BLOCK):
    """The block-diagonal ``BlockMask`` of a packed batch, from its (N,) nondecreasing sequence ids.

    Built at the level of ``block`` x ``block`` tiles (a (N / block)^2 table, not the N x N mask that
    ``create_block_mask`` evaluates in eager mode: 1.4 GB for N = 37k), with static shapes and no host read:
    a tile is skipped when its query and key tiles share no sequence, *full* (no mask evaluated) when both lie
    inside one sequence, and partial otherwise (the mask ``seq[q] == seq[kv]`` decides per element).
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = seq.shape[0]
    nb = -(-n // block)
    padded = torch.cat([seq, seq[-1:].expand(nb * block - n)]).view(nb, block)
    first, last = padded[:, 0], padded[:, -1]
    touch = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])  # (nb, nb) tiles sharing a sequence
    whole = first == last
    if n % block:  # the last tile is partly past the end: let the mask (and flex's bounds) handle it
        whole = whole & (torch.arange(nb, device=seq.device) < nb - 1)
    full = touch & whole[:, None] & whole[None, :]  # two single-sequence tiles that touch: the same sequence
    partial = touch & ~full

    def ordered(dense):  # (num_blocks, indices) per query tile: the kept tiles first
        num = dense.sum(-1, dtype=torch.int32)
        idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    def same_sequence(b, h, q_idx, kv_idx):
        return seq[q_idx] == seq[kv_idx]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, block, same_sequence, seq_lengths=(n, n))


def flex_attention_kernel(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """flex_attention with a block-diagonal mask: token i sees token j iff they belong to the same sequence;
    ``key_bias`` is a score modifier (in the kernel's float32 scores).

    ``seq``: the (N,) sequence ids, or the batch's ``BlockMask`` (``FlexBackend.context``, built once per forward).
    """
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if isinstance(seq, BlockMask):
        mask = seq
    else:  # a direct call: build the mask here
        mask = flex_block_mask(seq if seq is not None else seq_index(cu_seqlens, q.shape[0]))
    fn = flex_attention
    if q.device.type == "cuda":  # eager flex_attention materialises the scores; compiled, it is a fused kernel
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
        fn = _COMPILED_FLEX
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, hd)
    if v.dtype != q.dtype or k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    score_mod = None
    if key_bias is not None:
        bias = key_bias.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[kv_idx]

    return fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)[0].transpose(0, 1)


class FlexBackend(Backend):
    """CUDA, any dtype, no dropout (no flex backward on the CPU, and the CPU has faster backends anyway)."""

    def run(self, q, *args, **kwargs):
        # the kernel function compiles flex_attention on CUDA only (eager, it materialises the scores)
        self.note_kernel("flex_attention (compiled)" if q.device.type == "cuda" else "flex_attention (eager)")
        return flex_attention_kernel(q, *args, **kwargs)

    def available(self, device, dtype, dropout=False, grad=False) -> bool:
        return env.cuda(device) and not dropout and env.has_flex()

    def context(self, packed, key_bias, dtype) -> AttentionContext:
        return AttentionContext(self, packed, key_bias, flex_block_mask(packed.seq))

    def attend(self, q, k, v, ctx: AttentionContext, dropout_p, scale):
        p = ctx.packed
        return self.run(q, k, v, p.cu_seqlens, p.max_seqlen, dropout_p, scale, p.offsets, None, ctx.state, ctx.key_bias)
