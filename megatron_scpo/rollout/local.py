"""LocalEngine: a transformers causal LM sampled in the trainer's process (the CPU default).

Why not ``model.generate``: we need the log-prob of every sampled token under the sampling temperature
(before top-k/top-p truncation, see base.py), per-row stop handling (EOS, stop ids, stop strings) and a
batch that shrinks as rows finish. The loop below left-pads the prompts once, prefills them in one forward
with explicit position ids, then decodes one token per step against the KV cache, dropping finished rows
from the cache so late steps only pay for live rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_scpo.rollout.base import (
    FinishReason,
    RolloutInputError,
    Sample,
    SamplingParams,
    WeightSyncError,
    validate_n,
    validate_prompts,
    validate_score_inputs,
)


def _eos_ids(model: torch.nn.Module, tokenizer: Any | None) -> list[int]:
    """EOS ids from generation_config, config and tokenizer (any may be a list or None)."""
    out: list[int] = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        for e in eos if isinstance(eos, (list, tuple)) else [eos]:
            if isinstance(e, int) and e not in out:
                out.append(e)
    return out


def filter_logits(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (nucleus) filtering of temperature-scaled logits; removed entries become -inf."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_l, dim=-1)
        # drop a token when the mass strictly before it already exceeds top_p (the top token always stays)
        remove = (torch.cumsum(probs, dim=-1) - probs) > top_p
        sorted_l = sorted_l.masked_fill(remove, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, idx, sorted_l)
    return scaled


@torch.no_grad()
def teacher_forced_logprobs(
    model: torch.nn.Module, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0,
    batch_size: int = 64,
) -> list[list[float]]:
    """log_softmax(logits / T) of each token after its prompt, one right-padded full forward per batch."""
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[r, : len(sequences[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
        tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for r, i in enumerate(idx):
            out[i] = tok_lp[r, prompt_lens[i] - 1 : len(sequences[i]) - 1].tolist()
    return out


@dataclass
class _Row:
    prompt: int  # index of the prompt in the call
    ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish: FinishReason | None = None
    matched: int | str | None = None


class LocalEngine:
    """In-process sampling from a transformers causal LM (CPU default engine)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any | None = None,
        *,
        eos_token_ids: list[int] | None = None,
        max_batch_size: int = 256,
        max_context_len: int | None = None,
        strict_load: bool = True,
        weight_version: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self.max_batch_size = max_batch_size
        cfg = getattr(model, "config", None)
        self.vocab_size: int | None = getattr(cfg, "vocab_size", None)
        self.max_context_len = max_context_len or getattr(cfg, "max_position_embeddings", None)
        self.strict_load = strict_load
        self.weight_version = weight_version
        self._paused = False
        self._closed = False

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> LocalEngine:
        """Load an HF checkpoint dir (model + tokenizer if present) from local disk only."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tok = kwargs.pop("tokenizer", None)  # pass the project's tokenizer: AutoTokenizer may swap pre-tokenizers
        if tok is None and ((Path(path) / "tokenizer.json").exists() or (Path(path) / "tokenizer_config.json").exists()):
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(model, tok, **kwargs)

    # ---------------------------------------------------------------- generation
    def _check_ready(self) -> None:
        if self._closed:
            raise RuntimeError("LocalEngine: used after shutdown()")
        if self._paused:
            raise RuntimeError("LocalEngine: generate/score called while paused; call resume() first")

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        """Sample n responses per prompt; out[i][j] is sample j of prompt i."""
        params.validate()
        validate_n(n)
        validate_prompts(prompts, params.max_new_tokens, self.max_context_len, self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise RolloutInputError("SamplingParams.stop: stop strings need a tokenizer; LocalEngine has none")
        self._check_ready()
        rows = [_Row(p, list(prompts[p]), [], []) for p in range(len(prompts)) for _ in range(n)]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
        # group similar lengths to limit padding; the order is a pure function of the inputs (reproducible)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        for start in range(0, len(order), self.max_batch_size):
            self._generate_chunk([rows[i] for i in order[start : start + self.max_batch_size]], params, gen)
        out: list[list[Sample]] = [[] for _ in prompts]
        for r in rows:
            out[r.prompt].append(self._to_sample(r, params))
        return out

    def _to_sample(self, r: _Row, params: SamplingParams) -> Sample:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
            if isinstance(r.matched, str):  # SGLang trims the output text at the stop string
                cut = text.find(r.matched)
                text = text[:cut] if cut >= 0 else text
        assert r.finish is not None
        return Sample(r.ids, r.token_ids, text, r.logprobs, r.finish, self.weight_version, r.matched)

    @torch.no_grad()
    def _generate_chunk(self, rows: list[_Row], params: SamplingParams, gen: torch.Generator) -> None:
        from transformers import DynamicCache

        model = self.model
        device = next(model.parameters()).device
        width = max(len(r.ids) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last column is every row's last prompt token
            ids[i, width - len(r.ids) :] = torch.tensor(r.ids)
            mask[i, width - len(r.ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        cache = DynamicCache(config=model.config)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        next_pos = pos[:, -1] + 1
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long)
        stop_ids = stop_ids.to(device)
        t = params.logprob_temperature
        tail = 4 * max((len(s) for s in params.stop), default=0) + 2  # tokens that can hold a stop string
        live = list(range(len(rows)))  # row index (into `rows`) of each batch line
        for step in range(params.max_new_tokens):
            scaled = logits.float() / t
            logp = torch.log_softmax(scaled, dim=-1)
            if params.is_greedy:
                tok = scaled.argmax(dim=-1)
            else:
                probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
                tok = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(device)
            lp = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            hit_stop = torch.isin(tok, stop_ids).tolist() if stop_ids.numel() else [False] * len(live)
            keep: list[int] = []
            for b, (ri, tk, lpv) in enumerate(zip(live, tok.tolist(), lp.tolist())):
                r = rows[ri]
                r.token_ids.append(tk)
                r.logprobs.append(lpv)
                if hit_stop[b]:
                    r.finish, r.matched = "stop", tk
                elif params.stop and self._stop_string(r.token_ids[-tail:], params.stop) is not None:
                    r.finish, r.matched = "stop", self._stop_string(r.token_ids[-tail:], params.stop)
                elif step + 1 == params.max_new_tokens:
                    r.finish = "length"
                else:
                    keep.append(b)
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from the batch and the KV cache
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                mask, tok, next_pos = mask[sel], tok[sel], next_pos[sel]
                live = [live[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits = model(
                input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1),
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1

    def _stop_string(self, tail_ids: list[int], stops: list[str]) -> str | None:
        text = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        return next((s for s in stops if s in text), None)

    def score(self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log-probs of the tokens after each prompt (post-sync check, importance scoring)."""
        validate_score_inputs(sequences, prompt_lens, temperature, self.max_context_len, self.vocab_size)
        self._check_ready()
        return teacher_forced_logprobs(self.model, sequences, prompt_lens, temperature, self.max_batch_size)

    # ---------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Load HF-named tensors atomically: everything is checked before any parameter changes.

        Tied embeddings: a group of names sharing one storage (embed_tokens / lm_head) needs only one of
        them; if both arrive they must be equal. With ``strict_load`` every persistent tensor must be
        covered and unknown names are errors; otherwise unknown names are ignored.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise WeightSyncError(f"update_weights: version must be an int >= 0, got {version!r}")
        if self._closed:
            raise RuntimeError("LocalEngine: used after shutdown()")
        targets = self.model.state_dict(keep_vars=True)
        groups: dict[int, list[str]] = {}
        for name, t in targets.items():
            groups.setdefault(t.data_ptr(), []).append(name)
        incoming: dict[str, Tensor] = {}
        for name, t in named_tensors:
            if name not in targets:
                if self.strict_load:
                    raise WeightSyncError(f"update_weights: unknown tensor name {name!r} (strict load)")
                continue
            if tuple(t.shape) != tuple(targets[name].shape):
                raise WeightSyncError(
                    f"update_weights: {name!r} has shape {tuple(t.shape)}, model expects {tuple(targets[name].shape)}"
                )
            if not torch.isfinite(t).all():
                raise WeightSyncError(f"update_weights: {name!r} contains NaN/inf")
            incoming[name] = t
        for names in groups.values():
            given = [n for n in names if n in incoming]
            if not given and self.strict_load:
                raise WeightSyncError(f"update_weights: missing tensor(s) {names} (strict load)")
            for other in given[1:]:
                if not torch.equal(incoming[given[0]].float(), incoming[other].float()):
                    raise WeightSyncError(f"update_weights: tied tensors {given[0]!r} and {other!r} differ")
        with torch.no_grad():
            for name, t in incoming.items():
                targets[name].data.copy_(t.to(targets[name].dtype))
        self.weight_version = version

    # ---------------------------------------------------------------- lifecycle
    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def health(self) -> bool:
        return not self._closed

    def shutdown(self) -> None:
        self._closed = True
