"""The trainer-facing actor: megatron model + DDP + optimizer, log-prob passes, train steps, checkpoints.

Batch layout (both calls): ``input_ids`` / ``attention_mask`` [B, S] **right-padded** (each mask row is
1...1 0...0; left padding is rejected). Under data parallelism every call receives *this DP rank's* part of
the global batch; the TP/PP ranks of one DP replica must pass identical tensors. ``train_step`` takes a typed
``TrainBatch`` and the trainer's loss function (``backend/seam.py``: what crosses the seam and what comes back).

Packed sequences (``ParallelConfig.packed_sequences``, the default; ``backend/packing.py``): each micro-batch's
rows are concatenated into one THD row (Megatron ``PackedSeqParams``, cu_seqlens; per-sequence RoPE positions,
attention within each sequence only), and per-token results are put back on the [B, S] grid, so callers and
losses see the padded layout. ``max_tokens_per_micro_batch`` sizes micro-batches by real tokens (balanced).
Without packing: one [mbs, S] block per micro-batch, megatron's RoPE on positions 0..S-1.

Loss scaling (``train_step``): the loss is the aggregate over the **global** batch (all micro-batches of all
DP ranks), e.g. token-mean = sum of per-token terms / total response tokens, not a mean of micro-batch
means. Each micro-batch's loss from the loss function is weighted by units_mb / units_global (``LossFn.units``:
tokens or non-empty sequences, per aggregation mode; units_global is all-reduced over DP before the schedule
runs) and multiplied by num_microbatches * dp, which cancels the schedule's 1/num_microbatches and DDP's
gradient averaging over DP. The reported ``loss`` is exactly the global-batch loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from scpo_kernels import NonFiniteError

from megatron_scpo.backend import logprobs as lpmod
from megatron_scpo.backend.checkpoint import load_shards, save_shards
from megatron_scpo.backend.config import ParallelConfig
from megatron_scpo.backend.model import build_model, parse_hf_config, unwrap
from megatron_scpo.backend.packing import (
    balanced_partition,
    pack_rows,
    token_budget_micro_batches,
)
from megatron_scpo.backend.parallel import init_parallel
from megatron_scpo.backend.seam import BatchError, LossFn, TrainBatch


def _optim_value(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    return getattr(cfg, name, default)


def _check_right_padded(attention_mask: torch.Tensor) -> None:
    m = attention_mask.to(torch.int64)
    if not torch.all((m == 0) | (m == 1)):
        raise BatchError("attention_mask must contain only 0/1")
    if torch.any(m[:, 1:] > m[:, :-1]):
        raise BatchError("attention_mask must be right-padded (1...1 0...0 per row); left padding is not supported")


class MegatronPolicy:
    """One policy model sharded over TP x PP x DP, trained through megatron's pipeline schedules.

    Args:
        hf_config: HF config object or config.json dict (Llama / Qwen2 / Qwen3).
        parallel: layout (tp, pp, vpp, sequence_parallel, use_distributed_optimizer).
        optim_cfg: anything with ``lr``, ``weight_decay``, ``clip_grad`` and optionally ``adam_beta1``,
            ``adam_beta2``, ``adam_eps`` (the trainer's OptimConfig).
        dtype: "float32" or "bfloat16" (bf16 params, fp32 main params/grads in the optimizer).
        micro_batch_size: sequences per micro-batch in the pipeline schedule.
        seed: megatron's model-parallel RNG seed (also seeds init when no weights are loaded).
    """

    def __init__(
        self,
        hf_config: Any,
        parallel: ParallelConfig | None = None,
        optim_cfg: Any = None,
        *,
        dtype: str = "float32",
        micro_batch_size: int = 1,
        seed: int = 1234,
        ckpt_optim_sharding: str = "fully_reshardable",
    ) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.parallel = parallel or ParallelConfig()
        self.parallel.validate()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if ckpt_optim_sharding not in ("fully_reshardable", "dp_reshardable"):
            raise ValueError(f"ckpt_optim_sharding={ckpt_optim_sharding!r}; choose fully_reshardable or dp_reshardable")
        self.arch = parse_hf_config(hf_config)
        self.hf_config = hf_config
        self.micro_batch_size = micro_batch_size
        self.packed = bool(self.parallel.packed_sequences)
        self.max_tokens = self.parallel.max_tokens_per_micro_batch
        self.ckpt_optim_sharding = ckpt_optim_sharding
        self.info = init_parallel(
            self.parallel.tp,
            self.parallel.pp,
            vpp=self.parallel.vpp,
            seed=seed,
            num_heads=self.arch.num_heads,
            num_kv_heads=self.arch.num_kv_heads,
            num_layers=self.arch.num_layers,
        )
        torch.manual_seed(seed)
        chunks = build_model(hf_config, self.parallel, dtype)
        self.config = unwrap(chunks[0]).config
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_cfg, module=m, disable_bucketing=(i > 0))
            for i, m in enumerate(chunks)
        ]
        bf16 = self.config.bf16
        self.optim_config = OptimizerConfig(
            optimizer="adam",
            lr=float(_optim_value(optim_cfg, "lr", 1e-6)),
            weight_decay=float(_optim_value(optim_cfg, "weight_decay", 0.01)),
            adam_beta1=float(_optim_value(optim_cfg, "adam_beta1", 0.9)),
            adam_beta2=float(_optim_value(optim_cfg, "adam_beta2", 0.999)),
            adam_eps=float(_optim_value(optim_cfg, "adam_eps", 1e-8)),
            clip_grad=float(_optim_value(optim_cfg, "clip_grad", 1.0)),
            bf16=bf16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(self.optim_config, self.model)
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.steps_done = 0
        # Cumulative over every schedule run (log-prob and training passes): real tokens, positions the model
        # computed, and positions the padded layout computes for the same rows (padding efficiency = ratio).
        self.position_stats = {"real_tokens": 0, "computed_positions": 0, "padded_positions": 0}

    # ------------------------------------------------------------------ groups / helpers
    @property
    def _ps(self) -> Any:
        from megatron.core import parallel_state

        return parallel_state

    def _plan(self, attention_mask: torch.Tensor, mbs: int) -> list[list[int]]:
        """Row indices of each micro-batch.

        Token budget: the fewest micro-batches that fit it, balanced by tokens. Packed without a budget:
        ceil(B / mbs) micro-batches of at most ``mbs`` rows balanced by tokens (LPT; under PP every micro-batch
        is padded to the longest, so balance is what keeps that padding small). Padded: runs
        of ``mbs`` consecutive rows (as before packing existed).
        """
        b = attention_mask.shape[0]
        lengths = attention_mask.to(torch.int64).sum(-1).tolist()
        if self.max_tokens is not None:
            # interleaved 1F1B wants the micro-batch count a multiple of PP (megatron checks it)
            mult = self.parallel.pp if self.parallel.vpp > 1 else 1
            return token_budget_micro_batches(lengths, self.max_tokens, multiple_of=mult)
        if self.packed:
            return balanced_partition(lengths, -(-b // mbs), max_size=mbs)
        return [list(range(i, min(i + mbs, b))) for i in range(0, b, mbs)]

    def _packed_micro_batches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: list[list[int]],
                              batch: TrainBatch | None = None) -> list[dict[str, Any]]:
        """One dict per micro-batch: its rows of ``input_ids`` / ``attention_mask``, ``_rows``, (packed) ``_packed``
        and (training) ``batch``, the micro-batch's rows of the TrainBatch that the loss function reads.

        Packed rows share one length under PP (megatron's P2P exchanges [T, 1, hidden] of a fixed T per
        schedule: the longest micro-batch's real tokens), rounded up to a multiple of TP under sequence
        parallelism (the sequence dimension is split over TP ranks).
        """
        am = attention_mask
        mult = self.parallel.tp if self.config.sequence_parallel else 1
        row_len = None
        if self.packed and self.parallel.pp > 1:
            longest = max(int(am[rows].sum()) if rows else 0 for rows in plan)
            row_len = max(1, -(-longest // mult) * mult)
        out: list[dict[str, Any]] = []
        for rows in plan:
            ix = torch.as_tensor(rows, dtype=torch.long)
            mb: dict[str, Any] = {"input_ids": input_ids[ix], "attention_mask": am[ix], "_rows": ix}
            if batch is not None:
                mb["batch"] = batch.rows(ix)
            if self.packed:
                mb["_packed"] = pack_rows(mb["input_ids"], mb["attention_mask"], 0, row_len=row_len, multiple_of=mult)
            out.append(mb)
        return out

    def _iterators(self, mbs_list: list[dict[str, torch.Tensor]]) -> Iterator | list[Iterator]:
        if len(self.model) == 1:
            return iter(mbs_list)
        return [iter(mbs_list) for _ in self.model]  # one iterator per virtual-pipeline chunk

    def _run_schedule(self, mbs_list: list[dict], forward_step: Any, forward_only: bool, collect: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for mb in mbs_list:
            real, grid = int(mb["attention_mask"].sum()), int(mb["input_ids"].numel())
            self.position_stats["real_tokens"] += real
            self.position_stats["padded_positions"] += grid
            self.position_stats["computed_positions"] += mb["_packed"].total if "_packed" in mb else grid
        if "_packed" in mbs_list[0]:  # THD: hidden states [T, 1, h], one T for all micro-batches under PP
            seq, mbs = mbs_list[0]["_packed"].total, 1
        else:
            seq, mbs = mbs_list[0]["input_ids"].shape[1], mbs_list[0]["input_ids"].shape[0]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=self._iterators(mbs_list),
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(mbs_list),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
            collect_non_loss_data=collect,
        )

    def _check_seq(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise BatchError(
                f"input_ids and attention_mask must both be [B, S]; got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise BatchError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise BatchError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.arch.vocab_size:
            raise BatchError(f"input_ids out of range [0, {self.arch.vocab_size}): min={lo} max={hi}")
        if input_ids.shape[1] > self.arch.max_position_embeddings:
            raise BatchError(
                f"sequence length {input_ids.shape[1]} > max_position_embeddings={self.arch.max_position_embeddings}"
            )
        if self.config.sequence_parallel and not self.packed and input_ids.shape[1] % self.parallel.tp != 0:
            raise BatchError(f"sequence_parallel needs S divisible by tp={self.parallel.tp}, got S={input_ids.shape[1]}")
        _check_right_padded(attention_mask)

    def _forward_step(self, loss_fn: Any, data_iterator: Iterator, model: Any) -> tuple[torch.Tensor, Any]:
        mb = next(data_iterator)
        pk = mb.get("_packed")
        if pk is not None:
            # THD: TE's attention and the local spec's PackedDotProductAttention both take the sequence
            # boundaries from cu_seqlens (no mask); RoPE restarts per sequence.
            out = model(pk.input_ids, pk.position_ids, None, packed_seq_params=pk.packed_seq_params())
            return out, partial(loss_fn, mb)
        ids = mb["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        # attention_mask=None: megatron applies its causal mask; right padding never affects real tokens.
        out = model(ids, pos, None)
        return out, partial(loss_fn, mb)

    def _token_logprobs(self, mb: dict[str, Any], logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """fp32 ``[n, S]`` log-probs of the micro-batch's rows (0 at t=0 and on padding), packed or padded."""
        pk = mb.get("_packed")
        lp = lpmod.token_logprobs(
            logits,
            mb["input_ids"] if pk is None else pk.input_ids,
            vocab_size=self.arch.vocab_size,
            temperature=temperature,
            tp_group=self._ps.get_tensor_model_parallel_group() if self.parallel.tp > 1 else None,
            tp_rank=self._ps.get_tensor_model_parallel_rank(),
        )
        if pk is not None:  # [1, T]: a sequence's first token has no log-prob; back onto the [n, S] grid
            lp = pk.unpack(lp.index_fill(1, pk.starts.to(lp.device), 0.0))
        return lp * mb["attention_mask"].to(lp.dtype)

    def _broadcast_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        if self.parallel.pp == 1:
            return t
        dist.broadcast(
            t, src=self._ps.get_pipeline_model_parallel_last_rank(), group=self._ps.get_pipeline_model_parallel_group()
        )
        return t

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def compute_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float = 1.0,
        micro_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Forward-only pass: out[b, t] = log p(ids[b, t] | ids[b, :t]) (fp32 [B, S], 0 at t=0 and on padding).

        Returned on every rank (broadcast from the last pipeline stage), on the inputs' device: the trainer's
        host tensors go to the model's device (``self.device``) and the result comes back.
        """
        self._check_seq(input_ids, attention_mask)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        host = input_ids.device
        out = self._logprobs_on_device(input_ids.to(self.device), attention_mask.to(self.device), temperature,
                                       micro_batch_size or self.micro_batch_size)
        return out.to(host)

    def _logprobs_on_device(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                            mbs: int) -> torch.Tensor:
        b = input_ids.shape[0]

        def collect(mb: dict, logits: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
            return self._token_logprobs(mb, logits, temperature)

        if self.packed or self.max_tokens is not None:
            mbs_list = self._packed_micro_batches(input_ids, attention_mask, self._plan(attention_mask, mbs))
            out = self._run_schedule(mbs_list, partial(self._forward_step, collect), forward_only=True, collect=True)
            result = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
            if self._ps.is_pipeline_last_stage():
                for mb, lp in zip(mbs_list, out):
                    result[mb["_rows"].to(result.device)] = lp.float().to(result.device)
            return self._broadcast_from_last_stage(result)
        n_pad = (-b) % mbs  # pad with copies of row 0 so every micro-batch has the same shape
        ids = torch.cat([input_ids, input_ids[:1].expand(n_pad, -1)]) if n_pad else input_ids
        am = torch.cat([attention_mask, attention_mask[:1].expand(n_pad, -1)]) if n_pad else attention_mask
        mbs_list = self._packed_micro_batches(ids, am, self._plan(am, mbs))  # padded: runs of mbs rows
        out = self._run_schedule(mbs_list, partial(self._forward_step, collect), forward_only=True, collect=True)
        if self._ps.is_pipeline_last_stage():
            result = torch.cat(list(out), dim=0).float()
        else:
            result = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        return self._broadcast_from_last_stage(result)[:b]

    # ------------------------------------------------------------------ training
    def _validate_train_batch(self, batch: TrainBatch, loss_fn: LossFn, mbs: int) -> None:
        if not isinstance(batch, TrainBatch):
            raise BatchError(f"train_step takes a backend.seam.TrainBatch, got {type(batch).__name__}")
        self._check_seq(batch.input_ids, batch.attention_mask)
        batch.validate(tuple(loss_fn.requires))
        if not self.packed and self.max_tokens is None and batch.size % mbs != 0:
            raise BatchError(f"batch size {batch.size} is not a multiple of micro_batch_size={mbs}")

    def _loss_func(
        self,
        loss_fn: LossFn,
        units_global: float,
        n_mb: int,
        mb: dict[str, Any],
        logits: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Megatron's loss_func: the trainer's loss on this micro-batch, scaled to its share of the global loss."""
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        mask = mb["batch"].loss_mask.bool()
        ntok = mask.sum().to(torch.float32)
        try:
            lp = self._token_logprobs(mb, logits, loss_fn.temperature)
        except NonFiniteError:
            # NaN/inf logits: the kernel refuses them (never a silent NaN). Raising here would leave the other
            # pipeline stages / DP replicas waiting in the schedule's collectives, so the micro-batch becomes
            # a NaN loss instead: backward and the metric all-reduces run as usual on every rank, then
            # train_step sees the NaN loss everywhere and skips the optimizer step.
            nan = logits.float().sum() * float("nan")
            return nan, {"loss": nan.detach().reshape(()), "tokens": ntok, **{n: zero for n in loss_fn.stat_names}}
        units = float(loss_fn.units(mask))
        weight = units / units_global if units_global > 0 else 0.0
        if units == 0:
            value = (lp * 0.0).sum()  # keeps the graph connected for the pipeline's backward
            stats = {n: zero for n in loss_fn.stat_names}
        else:
            value, stats = loss_fn(mb["batch"], lp)
        contribution = value * weight
        report = {"loss": contribution.detach().clone().float(), "tokens": ntok.float(), **stats}
        return contribution * (n_mb * self.info.dp), report

    def _reduce_metrics(self, dicts: list[dict[str, torch.Tensor]], stat_names: tuple[str, ...]) -> dict[str, float]:
        """Sum over micro-batches, pipeline stages and DP ranks; stats (token sums) become global token means."""
        names = ["loss", "tokens", *stat_names]
        vec = torch.zeros(len(names), dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        for d in dicts:
            vec += torch.stack([d[n].double().reshape(()).to(vec.device) for n in names])
        if self.parallel.pp > 1:
            dist.all_reduce(vec, group=self._ps.get_pipeline_model_parallel_group())
        if self.info.dp > 1:
            dist.all_reduce(vec, group=self._ps.get_data_parallel_group())
        out = dict(zip(names, vec.tolist()))
        tok = max(out["tokens"], 1.0)
        return {"loss": out["loss"], "num_tokens": out["tokens"], **{n: out[n] / tok for n in stat_names}}

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, micro_batch_size: int | None = None) -> dict[str, float]:
        """One optimizer step of ``loss_fn`` over this DP rank's ``batch`` (micro-batched); metrics over the global batch.

        The loss is the aggregate over the global batch (module docstring). Returns: ``loss`` (the global-batch
        loss), ``num_tokens`` (loss tokens, all DP ranks), one token mean per ``loss_fn.stat_names``,
        ``grad_norm`` (before clipping), ``lr``, ``skipped``, ``nonfinite_loss``, ``nonfinite_grad_norm`` (0/1).
        A non-finite loss (including NaN/inf logits, scpo_kernels.NonFiniteError) or gradient norm skips the
        optimizer step (``skipped`` = 1.0, ``grad_norm`` reported as computed; ``nonfinite_loss`` /
        ``nonfinite_grad_norm`` = 1.0 say which) and leaves the weights and the Adam state unchanged.
        ``micro_batch_size``: rows per micro-batch (the constructor's when None; packed: at most that many rows,
        token-balanced; a token budget replaces it). Raises BatchError (before any compute) for a malformed
        batch or a field the loss reads but is missing.
        """
        mbs = micro_batch_size or self.micro_batch_size
        self._validate_train_batch(batch, loss_fn, mbs)
        batch = batch.to(self.device)  # the trainer's host tensors -> the model's device (no-op on CPU)
        units = loss_fn.units(batch.loss_mask.bool()).reshape(1)
        if self.info.dp > 1:
            dist.all_reduce(units, group=self._ps.get_data_parallel_group())
        plan = self._plan(batch.attention_mask, mbs)
        mbs_list = self._packed_micro_batches(batch.input_ids, batch.attention_mask, plan, batch)
        loss_func = partial(self._loss_func, loss_fn, float(units), len(mbs_list))

        self._zero_grads()
        out = self._run_schedule(mbs_list, partial(self._forward_step, loss_func), forward_only=False, collect=False)
        metrics = self._reduce_metrics(out if self._ps.is_pipeline_last_stage() else [], tuple(loss_fn.stat_names))
        if not torch.isfinite(torch.tensor(metrics["loss"])):
            self._zero_grads()
            return {**metrics, "grad_norm": float("nan"), "lr": self.lr, "skipped": 1.0, "nonfinite_loss": 1.0,
                    "nonfinite_grad_norm": 0.0}
        ok, grad_norm = self._optimizer_step()
        if ok:
            self.steps_done += 1
        else:
            self._zero_grads()
            if dist.get_rank() == 0:
                print(f"[backend] non-finite gradient norm ({grad_norm}): optimizer step skipped", flush=True)
        return {**metrics, "grad_norm": grad_norm, "lr": self.lr, "skipped": 0.0 if ok else 1.0,
                "nonfinite_loss": 0.0, "nonfinite_grad_norm": 0.0 if ok else 1.0}

    def _zero_grads(self) -> None:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _optimizer_step(self) -> tuple[bool, float]:
        """megatron's ``optimizer.step()`` split into its phases, so a non-finite grad norm skips the update.

        megatron (bf16/fp32, no loss scaler) would clip by a NaN norm (a no-op) and let Adam write NaN into
        every weight. Same phases and the same global norm as ``ChainedOptimizer.step``: copy grads to the
        main params, one norm over all sub-optimizers (all-reduced over the model-parallel and distributed-
        optimizer groups, so every rank takes the same branch), clip by it, step. Returns (stepped, norm).
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        if opt.prepare_grads():  # inf/nan found by a loss scaler (fp16 only; bf16/fp32 have none)
            return False, float("nan")
        grad_norm = float(opt.get_grad_norm())
        if not math.isfinite(grad_norm):
            return False, grad_norm
        clip = self.optim_config.clip_grad
        if clip > 0.0:
            for sub in getattr(opt, "chained_optimizers", None) or [opt]:
                params = sub.get_parameters()
                if params:
                    decoupled = sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                    clip_grad_by_total_norm_fp32(params, clip, grad_norm, decoupled)
        return bool(opt.step_with_ready_grads()), grad_norm

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (cuda:<local rank> on GPU nodes, cpu here)."""
        return next(self.model[0].parameters()).device

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """The trainer owns the schedule; it sets the lr before each step."""
        for g in self.optimizer.param_groups:
            g["lr"] = float(lr)

    # ------------------------------------------------------------------ weights
    def modules(self) -> list[Any]:
        """The GPTModel chunks (unwrapped from DDP / Float16Module), e.g. for the convert engineer's mapping."""
        return [unwrap(m) for m in self.model]

    def named_hf_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors (weight sync / export), streamed by megatron_scpo.convert; collective."""
        from megatron_scpo.convert.live import iter_hf_tensors

        yield from iter_hf_tensors(self.modules(), self.hf_config)

    def load_hf_weights(self, hf_state_dict: dict[str, torch.Tensor]) -> None:
        """Load full HF-named tensors into this rank's shards and refresh the optimizer's main params."""
        from megatron_scpo.convert.live import load_hf_into_model

        load_hf_into_model(self.modules(), self.hf_config, hf_state_dict)
        self.optimizer.reload_model_params()

    # ------------------------------------------------------------------ checkpoints
    def save_shards(self, directory: str | os.PathLike) -> None:
        """Model + optimizer shards and the backend meta into ``directory`` (collective; ``backend/checkpoint.py``).

        Not atomic and no RNG: ``CheckpointManager.save`` hands a directory inside its temp dir and saves the RNG.
        """
        save_shards(self, directory)

    def load_shards(self, directory: str | os.PathLike, load_optimizer: bool = True) -> dict[str, Any]:
        """Load ``save_shards``'s directory (any TP/PP for fully_reshardable); returns its meta (``load_shards``)."""
        return load_shards(self, directory, load_optimizer=load_optimizer)
