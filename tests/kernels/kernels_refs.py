"""Slow, obviously-correct references for the kernel tests (float64, plain Python loops)."""

from __future__ import annotations

import torch


def logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """log_softmax + gather and entropy in float64 (differentiable)."""
    z = torch.log_softmax(logits.double() / temperature, -1)
    keep = targets != ignore_index
    lp = z.gather(1, torch.where(keep, targets, 0).long()[:, None]).squeeze(1) * keep
    ent = -(z.exp() * z).sum(-1)
    return lp, ent


def sgae_ref(rewards, mask, step_ids=None, boundaries=None, seq_ends=None, gamma=1.0, lam=1.0, values=None):
    """S-GAE by walking each row token by token and building explicit step lists."""
    bsz, t_len = rewards.shape
    adv = torch.zeros(bsz, t_len, dtype=torch.float64)
    ret = torch.zeros(bsz, t_len, dtype=torch.float64)
    for b in range(bsz):
        seqs: list[list[list[int]]] = []  # sequences -> steps -> token indices
        prev = None
        for t in range(t_len):
            if not bool(mask[b, t]):
                continue
            new_seq = prev is None or (seq_ends is not None and bool(seq_ends[b, prev:t].any()))
            if new_seq:
                seqs.append([[t]])
            else:
                if step_ids is not None:
                    new_step = int(step_ids[b, t]) != int(step_ids[b, prev])
                elif boundaries is not None:
                    new_step = bool(boundaries[b, prev])
                else:
                    new_step = True
                if new_step:
                    seqs[-1].append([t])
                else:
                    seqs[-1][-1].append(t)
            prev = t
        for steps in seqs:
            r = [sum(float(rewards[b, i]) for i in st) for st in steps]
            v = [float(values[b, st[0]]) if values is not None else 0.0 for st in steps] + [0.0]
            acc = 0.0
            for j in reversed(range(len(steps))):
                delta = r[j] + (gamma * v[j + 1] - v[j] if values is not None else 0.0)
                acc = delta + gamma * lam * acc
                for i in steps[j]:
                    adv[b, i] = acc
                    ret[b, i] = acc + v[j]
    return adv, ret
