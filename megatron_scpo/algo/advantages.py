"""Advantages: GRPO group normalization and S-GAE over steps (SCPO, reconstructed).

Step-level quantities are padded tensors ``[B, K]`` with a boolean ``step_mask[B, K]`` (step k of
sample b exists). Token-level quantities are ``[B, T]`` with ``step_ids[B, T]`` (-1 outside the
response). This file is the specification of S-GAE. Its one loop, ``discounted_reverse_sum``, is a
``DiscountedScan`` argument of ``s_gae`` / ``s_gae_critic`` (default: the spec): the trainer passes the
kernels package's ``step_discounted_sum`` (the same scan through ``segmented_gae``; algo imports no kernel).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from megatron_scpo.algo.groups import check_finite, group_index, group_normalize, masked_group_stats

__all__ = [
    "group_normalize",
    "DiscountedScan",
    "discounted_reverse_sum",
    "s_gae",
    "s_gae_critic",
    "broadcast_to_tokens",
    "values_at_step_starts",
    "bounded",
]


def _check_step_shapes(step_rewards: Tensor, step_mask: Tensor) -> None:
    if step_rewards.dim() != 2 or step_rewards.shape != step_mask.shape:
        raise ValueError(
            f"step_rewards [B, K] and step_mask [B, K] must match, got {tuple(step_rewards.shape)} "
            f"and {tuple(step_mask.shape)}"
        )
    check_finite("step_rewards", torch.where(step_mask.bool(), step_rewards, torch.zeros_like(step_rewards)))


class DiscountedScan(Protocol):
    """A discounted suffix scan with ``discounted_reverse_sum``'s signature and semantics (it is the spec).

    ``(x [B, K], step_mask [B, K], decay, *, reduce) -> [B, K]``; the trainer injects the kernel op
    (``scpo_kernels.gae.step_discounted_sum``), tested equal to the spec (bitwise in fp64 for K <= 128).
    """

    def __call__(
        self, x: Tensor, step_mask: Tensor, decay: float, *, reduce: Literal["sum", "mean"] = "sum"
    ) -> Tensor: ...


def discounted_reverse_sum(
    x: Tensor, step_mask: Tensor, decay: float, *, reduce: Literal["sum", "mean"] = "sum"
) -> Tensor:
    """``out_j = sum_{m>=j, valid} decay^(m-j) x_m`` per row (``mean``: divided by ``sum decay^(m-j)``).

    Steps are contiguous from 0 in each row, so padding only appears at the end; padded outputs are 0.
    """
    m = step_mask.to(torch.float64)
    xv = x.to(torch.float64) * m
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    wacc = torch.zeros_like(acc)
    out = torch.zeros_like(xv)
    for j in range(x.shape[1] - 1, -1, -1):
        acc = xv[:, j] + decay * acc
        wacc = m[:, j] + decay * wacc
        out[:, j] = acc if reduce == "sum" else acc / wacc.clamp(min=1e-12)
    return out * m


def s_gae(
    step_rewards: Tensor,
    step_mask: Tensor,
    group_ids: Tensor,
    *,
    gamma_lambda: float,
    reduce: Literal["sum", "mean"] = "sum",
    normalize: bool = True,
    eps: float = 1e-6,
    std_floor: float = 0.0,
    scan: DiscountedScan = discounted_reverse_sum,
) -> Tensor:
    """Critic-free S-GAE (reconstructed): group-normalize all step rewards, then reverse-accumulate.

    ``rn = (r - mean_g) / (max(std_g, std_floor) + eps)`` over every valid step of every sample in the group
    (population std; the floor, in reward units, keeps a near-zero std from blowing tiny reward differences
    up to O(1)); ``A_j = sum_{m>=j} (gamma*lambda)^(m-j) rn_m``. With gamma*lambda = 1 and no floor this is
    GRPO process supervision (DeepSeekMath). ``scan`` runs the accumulation (see ``DiscountedScan``).
    Returns step advantages [B, K] (0 on padding, float64).
    """
    _check_step_shapes(step_rewards, step_mask)
    mask = step_mask.bool()
    r = step_rewards.to(torch.float64)
    if normalize:
        inv, n = group_index(group_ids)
        gid = inv[:, None].expand_as(r)
        mean, std, _ = masked_group_stats(r, gid, n, mask)
        sd = std[gid]
        r = torch.where(sd > 0, (r - mean[gid]) / (sd.clamp(min=std_floor) + eps), torch.zeros_like(r))
    return scan(r, mask, gamma_lambda, reduce=reduce)


def s_gae_critic(
    step_rewards: Tensor,
    step_values: Tensor,
    step_mask: Tensor,
    *,
    gamma: float,
    lam: float,
    scan: DiscountedScan = discounted_reverse_sum,
) -> tuple[Tensor, Tensor]:
    """S-GAE with a critic read at step starts: ``delta_j = r_j + gamma V_(j+1) - V_j`` (V after the last step = 0).

    ``scan`` accumulates the deltas with decay gamma*lam (see ``DiscountedScan``). Returns (advantages [B, K], returns = advantages + values [B, K]); padding is 0.
    """
    _check_step_shapes(step_rewards, step_mask)
    if step_values.shape != step_rewards.shape:
        raise ValueError(f"step_values must be [B, K] = {tuple(step_rewards.shape)}, got {tuple(step_values.shape)}")
    mask = step_mask.bool()
    check_finite("step_values", torch.where(mask, step_values, torch.zeros_like(step_values)))
    m = mask.to(torch.float64)
    v = step_values.to(torch.float64) * m
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1) * torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1)
    delta = (step_rewards.to(torch.float64) + gamma * v_next - v) * m
    adv = scan(delta, mask, gamma * lam)
    return adv, (adv + v) * m


def broadcast_to_tokens(step_values: Tensor, step_ids: Tensor) -> Tensor:
    """Give every token the value of its step: ``out[b, t] = step_values[b, step_ids[b, t]]``, 0 where id < 0."""
    if step_ids.dim() != 2 or step_values.dim() != 2 or step_ids.shape[0] != step_values.shape[0]:
        raise ValueError(
            f"need step_values [B, K] and step_ids [B, T], got {tuple(step_values.shape)}, {tuple(step_ids.shape)}"
        )
    valid = step_ids >= 0
    if bool((step_ids >= step_values.shape[1]).any()):
        raise ValueError(f"step_ids reference step >= K = {step_values.shape[1]}")
    idx = step_ids.clamp(min=0)
    if step_values.shape[1] == 0:
        return torch.zeros(step_ids.shape, dtype=step_values.dtype, device=step_values.device)
    out = torch.gather(step_values, 1, idx)
    return torch.where(valid, out, torch.zeros_like(out))


def values_at_step_starts(values: Tensor, step_ids: Tensor, num_steps: int) -> Tensor:
    """Critic values read at the first token of each step -> [B, num_steps] (0 for absent steps)."""
    if values.shape != step_ids.shape:
        raise ValueError(f"values and step_ids must both be [B, T], got {tuple(values.shape)}, {tuple(step_ids.shape)}")
    B, T = step_ids.shape
    out = torch.zeros(B, num_steps, dtype=values.dtype, device=values.device)
    prev = torch.cat([torch.full_like(step_ids[:, :1], -1), step_ids[:, :-1]], dim=1)
    starts = (step_ids >= 0) & (step_ids != prev)
    b, t = starts.nonzero(as_tuple=True)
    out[b, step_ids[b, t]] = values[b, t]
    return out


def bounded(x: Tensor, bound: float, slope: float = 1.0) -> Tensor:
    """``bound * tanh(slope * x / bound)``: ~ ``slope * x`` near 0, strictly inside (-bound, bound); 0 if bound = 0.

    SCPO's split/critic length advantage (ours, issue 11 item 1): a std-normalized sum is scale-free and
    unbounded, so a tiny group std could make it outweigh the outcome advantage; the squash cannot.
    """
    if bound < 0 or slope < 0:
        raise ValueError(f"bound and slope must be >= 0, got {bound}, {slope}")
    if bound == 0:
        return torch.zeros_like(x)
    return bound * torch.tanh(slope * x / bound)
