"""Packed sequences (no padding between them) and token-budget micro-batches for the backend.

The trainer hands the backend right-padded ``[B, S]`` rows (``trainer/batching.py``); with
``ParallelConfig.packed_sequences`` the backend removes the padding before the model runs, as verl's
``use_remove_padding`` does (``verl/utils/model.py`` unpad/pad around the actor's forward):

- ``pack_rows``: the real tokens of a micro-batch's rows are concatenated into one row ``[1, T]`` with
  per-sequence position ids (0..len-1) and ``cu_seqlens`` = [0, len_0, len_0+len_1, ...] (int32), the layout
  of Megatron's ``PackedSeqParams(qkv_format="thd")``. A tail of padding (to a fixed row length under
  pipeline parallelism, or a multiple of TP under sequence parallelism) is one extra segment of its own, so
  no real token ever attends to it.
- Attention never crosses a boundary: on GPU Transformer Engine's THD attention reads ``cu_seqlens``; on
  CPU ``PackedDotProductAttention`` (the local spec's core attention, ``model.py``) computes exactly the
  block-diagonal causal attention (``block_causal_mask``), per sequence (``segment_grid``): q/k/v regrouped
  as ``[L, n, heads, d]`` under megatron's causal mask, O(n L^2) instead of O(T^2). RoPE restarts at 0 in every sequence in both cases:
  megatron's ``apply_rotary_pos_emb`` splits q/k by ``cu_seqlens`` (``_apply_rotary_pos_emb_thd``; megatron's
  RoPE never reads ``position_ids``, which only feed learned absolute embeddings).
- ``PackedRows.unpack``: per-position values of the packed row back to the ``[n, S]`` padded grid
  (differentiable), so losses and their aggregation modes are computed exactly as on the padded path.

Token-budget micro-batches (verl ``use_dynamic_bsz`` / ``ppo_max_token_len_per_gpu``, slime
``--max-tokens-per-gpu``): ``token_budget_micro_batches`` splits a rank's rows into the fewest micro-batches
whose real tokens fit the budget, balanced by token count (longest-processing-time greedy, not first-fit in
arrival order); ``balanced_partition`` is the same partition with a fixed number of parts (DP ranks).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def balanced_partition(lengths: Sequence[int], k: int, equal_size: bool = False,
                       max_size: int | None = None) -> list[list[int]]:
    """Split item indices into ``k`` parts with near-equal sums of ``lengths`` (LPT greedy).

    Items are taken longest first and each goes to the part with the smallest sum so far that still has room
    (ties: the lower part index, so the result is deterministic and identical on every rank). ``equal_size``:
    every part gets ``len // k`` or ``len // k + 1`` items (any part may be one of the larger ones);
    ``max_size``: at most that many items per part. LPT's largest sum is at most 4/3 of the optimum (Graham
    1969); verl uses Karmarkar-Karp for the same job (``seqlen_balancing.py``). Each part lists its indices in
    ascending order. Raises ValueError for k < 1 or parts too small to hold every item.
    """
    if k < 1:
        raise ValueError(f"balanced_partition: k must be >= 1, got {k}")
    n = len(lengths)
    lo, extra = divmod(n, k)
    cap = lo + (1 if extra else 0) if equal_size else n
    if max_size is not None:
        cap = min(cap, max_size)
    if cap * k < n:
        raise ValueError(f"balanced_partition: {n} items do not fit {k} parts of at most {cap}")
    parts: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, i) for i in range(k)]  # (sum, part)
    at_hi = 0  # equal_size: parts that already hold lo + 1 items (at most ``extra`` of them)
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    for item in order:
        full = []
        while True:
            load, p = heapq.heappop(heap)
            size = len(parts[p])
            if size < cap and not (equal_size and size >= lo and at_hi >= extra):
                break
            full.append((load, p))
        parts[p].append(item)
        if equal_size and len(parts[p]) == lo + 1:
            at_hi += 1
        heapq.heappush(heap, (load + int(lengths[item]), p))
        for f in full:
            heapq.heappush(heap, f)
    return [sorted(p) for p in parts]


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int, multiple_of: int = 1) -> list[list[int]]:
    """The fewest balanced micro-batches (lists of row indices) whose token sums are <= ``max_tokens``.

    Starts from ceil(sum / max_tokens) parts and adds parts until every part fits, except that a row longer
    than the budget gets a micro-batch of its own (it cannot be split). ``multiple_of``: the number of parts
    is a multiple of it (megatron's interleaved schedule wants the micro-batch count a multiple of PP; parts
    may then be empty). Without it empty parts are dropped. Parts are ordered by their first row, empty ones
    last. Raises ValueError for max_tokens < 1.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens}")
    n = len(lengths)
    if n == 0:
        return []
    total = sum(int(x) for x in lengths)
    k = max(1, -(-total // max_tokens))
    k = -(-k // multiple_of) * multiple_of
    while True:
        parts = balanced_partition(lengths, k)
        over = [p for p in parts if len(p) > 1 and sum(int(lengths[i]) for i in p) > max_tokens]
        if not over or k >= n:
            kept = sorted((p for p in parts if p), key=lambda p: p[0])
            return kept + [[] for _ in range(k - len(kept))] if multiple_of > 1 else kept
        k += multiple_of


def block_causal_mask(cu_seqlens: Tensor, total: int) -> Tensor:
    """``[1, 1, total, total]`` bool, True = masked: causal within each ``cu_seqlens`` segment, nothing across.

    megatron's convention (``attention_mask_func`` fills True entries with -10000 before the softmax).
    """
    seg = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    bounds = cu_seqlens[1:-1].long()
    if bounds.numel():
        seg.index_add_(0, bounds, torch.ones_like(bounds))
    seg = seg.cumsum(0)
    pos = torch.arange(total, device=cu_seqlens.device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def segment_grid(cu_seqlens: Tensor) -> tuple[Tensor, int, int]:
    """Where each packed token sits in a ``[n, L]`` grid of its segments: (flat index ``[T]``, n, L).

    ``flat[t] = segment(t) * L + (t - start(segment(t)))`` with n segments and L the longest. Used to run
    the CPU attention per sequence (``model.packed_dot_product_attention``): O(n * L^2) like the padded layout,
    not O(T^2) as a dense block-diagonal mask over the packed row would be.
    """
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    n, length = int(lens.numel()), int(lens.max())
    seg = torch.repeat_interleave(torch.arange(n, device=cu.device), lens)
    pos = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seg]
    return seg * length + pos, n, length


@dataclass
class PackedRows:
    """One packed micro-batch: ``n`` rows of a right-padded ``[B, S]`` batch as one row of length T.

    Attributes:
        input_ids: ``[1, T]`` long; real tokens, then ``pad_id`` up to T.
        position_ids: ``[1, T]`` long; 0..len-1 per sequence (the tail padding counts from 0 too).
        cu_seqlens: ``[m + 1]`` int32 segment offsets (m = non-empty rows, + 1 for a non-empty tail).
        max_seqlen: longest segment.
        lengths: real tokens per row (``attention_mask`` sum; rows of length 0 take no space).
        seq_len: S of the padded grid ``unpack`` returns.
        index: ``[sum(lengths)]`` long; flat position (row * S + col) in the ``[n, S]`` grid of each real token.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    lengths: list[int]
    seq_len: int
    index: Tensor

    @property
    def total(self) -> int:
        """T, the computed positions of the row (real tokens + tail padding)."""
        return int(self.input_ids.shape[1])

    @property
    def real_tokens(self) -> int:
        return int(self.index.numel())

    @property
    def starts(self) -> Tensor:
        """``[m]`` packed offset of each segment's first token (its log-prob is 0: nothing precedes it)."""
        return self.cu_seqlens[:-1].long()

    def unpack(self, packed: Tensor) -> Tensor:
        """``[1, T]`` (or ``[T]``) per-position values -> ``[n, S]`` on the padded grid, zeros elsewhere.

        Differentiable (an out-of-place ``index_put``), so a loss on the padded grid backpropagates into the
        packed forward.
        """
        flat = packed.reshape(-1)[: self.real_tokens]
        out = torch.zeros(len(self.lengths) * self.seq_len, dtype=packed.dtype, device=packed.device)
        return out.index_put((self.index.to(packed.device),), flat).view(len(self.lengths), self.seq_len)

    def packed_seq_params(self) -> object:
        """Megatron's ``PackedSeqParams`` for this row (qkv_format "thd", self-attention: q and kv alike)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, pad_id: int = 0, *, row_len: int | None = None,
              multiple_of: int = 1) -> PackedRows:
    """Concatenate the real tokens of right-padded rows ``[n, S]`` into one row (see ``PackedRows``).

    ``row_len``: pad the row to exactly this length (pipeline parallelism needs one shape for every
    micro-batch of a schedule); otherwise to the next multiple of ``multiple_of`` (TP under sequence
    parallelism). Raises ValueError when the real tokens exceed ``row_len``, or on an all-empty batch with
    no ``row_len``.
    """
    n, s = input_ids.shape
    lengths = [int(x) for x in attention_mask.to(torch.int64).sum(-1).tolist()]
    total_real = sum(lengths)
    t = row_len if row_len is not None else max(1, -(-total_real // multiple_of) * multiple_of)
    if total_real > t:
        raise ValueError(f"pack_rows: {total_real} real tokens do not fit a row of {t}")
    keep = attention_mask.reshape(-1).bool()
    index = torch.nonzero(keep, as_tuple=False).reshape(-1)
    ids = torch.full((1, t), int(pad_id), dtype=input_ids.dtype, device=input_ids.device)
    ids[0, :total_real] = input_ids.reshape(-1)[index]
    segs = [x for x in lengths if x > 0] + ([t - total_real] if t > total_real else [])
    cu = torch.zeros(len(segs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(segs, dtype=torch.int64), 0).to(torch.int32)
    pos = torch.cat([torch.arange(x, dtype=torch.long) for x in segs]).unsqueeze(0)
    return PackedRows(ids, pos.to(input_ids.device), cu.to(input_ids.device), max(segs), lengths, s,
                      index.to(input_ids.device))
