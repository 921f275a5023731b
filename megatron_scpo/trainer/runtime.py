"""What every stage shares: distributed layout, tokenizer, the Megatron policy, the rollout engine.

Multi-process choice (TP=2 under torchrun, or any TP/PP/DP with the local engine): **rank 0 owns the
LocalEngine** and broadcasts the finished rollouts (token ids, log-probs, verification results) to all
ranks with ``broadcast_object_list``. Every rank then runs the same Megatron passes on identical data.
We chose this over "every rank runs an identical engine" because it cannot diverge silently (sampling
on two processes is identical only while their kernels and thread counts are), and on CPU the other
ranks' idle time during generation is what a shared 2-core machine needs anyway. Weight sync gathers
full HF-named tensors on every rank (the convert export is collective) and only rank 0 loads them.
With SGLang the same holds: rank 0 talks HTTP to the servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_scpo.backend.parallel import broadcast_object
from megatron_scpo.backend.seam import LossFn, TrainBatch
from megatron_scpo.config import ExperimentConfig
from megatron_scpo.trainer.batching import PaddedBatch
from megatron_scpo.trainer.checkpoint import CheckpointManager
from megatron_scpo.trainer.metrics import MetricsLogger

if TYPE_CHECKING:  # megatron and transformers stay unimported until build_runtime (preflight runs first)
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from megatron_scpo.backend.policy import MegatronPolicy
    from megatron_scpo.rollout.base import RolloutEngine
    from megatron_scpo.trainer.reference import ReferencePolicy


@dataclass
class Runtime:
    """Live objects of a run (``run.build_runtime``): what the trainer hands the backend and the engine.

    ``engine`` exists on rank 0 only (None elsewhere). ``reference`` is the frozen KL reference of the
    current RL phase (``algo.loss.kl_coef > 0``, set by the run driver at the phase start; reference.py),
    None otherwise. ``policy.info`` (backend.parallel.ParallelInfo) is this rank's TP/PP/DP place.
    """

    cfg: ExperimentConfig
    run_dir: Path
    rank: int
    world: int
    tokenizer: PreTrainedTokenizerBase
    hf_config: PretrainedConfig
    hf_dir: Path
    policy: MegatronPolicy
    engine: RolloutEngine | None
    logger: MetricsLogger
    ckpt: CheckpointManager
    weight_version: int = 0
    global_step: int = 0
    reference: ReferencePolicy | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.tokenizer.eos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def encode_prompt(self, text: str) -> list[int]:
        """Rendered prompt text (``render_prompt`` of ``data.template``, maybe LAPO-extended) -> ids.

        The one encoding rule (``templates.encode_rendered``): chat prompts equal ``apply_chat_template(...,
        tokenize=True)``; raw prompts get the tokenizer's own BOS policy, never a second BOS. SFT data, rollouts
        and evaluation all come through here. Raises PromptTooLongError over ``data.max_prompt_tokens``.
        """
        from megatron_scpo.data.templates import encode_rendered

        return encode_rendered(text, self.cfg.data.template, self.tokenizer, max_tokens=self.cfg.data.max_prompt_tokens)

    def logprobs(self, padded: PaddedBatch, temperature: float, micro_batch_size: int | None = None) -> torch.Tensor:
        """Trainer log-probs ``[B, S]`` of a padded batch (collective over model-parallel ranks)."""
        mbs = micro_batch_size or self.cfg.rl.micro_batch_size
        return self.policy.compute_logprobs(padded.input_ids, padded.attention_mask, temperature=temperature,
                                            micro_batch_size=mbs)

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, micro_batch_size: int) -> dict[str, float]:
        """One optimizer step of ``loss_fn`` (``trainer/loss.py``) on this DP rank's ``batch``; the micro-batch is
        the largest divisor of the batch <= ``micro_batch_size`` (padded layout), or ``micro_batch_size`` rows,
        the last micro-batch shorter (packed: no shape to keep). Returns the backend's metrics (``train_step``)."""
        b = batch.size
        if self.policy.packed:
            mbs = min(b, micro_batch_size)
        else:
            mbs = max(d for d in range(1, min(b, micro_batch_size) + 1) if b % d == 0)
        # NaN/inf logits (scpo_kernels.NonFiniteError) become a NaN loss inside the backend, which then skips
        # the step on every rank with nonfinite_loss=1; a NaN/inf gradient norm gives nonfinite_grad_norm=1.
        return self.policy.train_step(batch, loss_fn, micro_batch_size=mbs)

    def sync_weights(self, check: bool | None = None, version: int | None = None) -> dict[str, float]:
        """Trainer shards -> HF-named tensors -> rank 0's engine; then the post-sync log-prob check.

        ``version`` re-publishes a known version (resume); by default every sync is a new version.
        """
        from megatron_scpo.convert.live import iter_hf_tensors

        self.weight_version = self.weight_version + 1 if version is None else version
        stream = iter_hf_tensors(self.policy.modules(), self.hf_config)
        if self.is_main:
            self.engine.update_weights(stream, self.weight_version)
        else:
            for _ in stream:  # collective: every rank walks the export in lockstep
                pass
        if not (self.cfg.rl.sync_check if check is None else check):
            return {}
        from megatron_scpo.rollout.check import make_check_sequences

        specials = tuple(i for i in (self.tokenizer.pad_token_id, self.tokenizer.bos_token_id, self.eos_id)
                         if i is not None)
        seqs, plens = make_check_sequences(len(self.tokenizer), self.cfg.rollout.check_num_sequences,
                                           self.cfg.rollout.check_seq_len, avoid_ids=specials)
        return self.post_sync_check(list(zip(seqs, plens)))

    def post_sync_check(self, seqs: list[tuple[list[int], int]]) -> dict[str, float]:
        """Engine and trainer score the same sequences; the max |diff| must stay under the tolerance."""
        from megatron_scpo.rollout.check import check_logprobs
        from megatron_scpo.trainer.batching import pad_batch

        ids = [s for s, _ in seqs]
        plens = [p for _, p in seqs]
        padded = pad_batch([s[:p] for s, p in seqs], [s[p:] for s, p in seqs], self.pad_id)
        trainer_lp = padded.gather(self.logprobs(padded, temperature=1.0))
        trainer_rows = [trainer_lp[i, :n].tolist() for i, n in enumerate(padded.response_lens)]
        out: dict[str, float] = {}
        if self.is_main:
            out = check_logprobs(self.engine, lambda *_a: trainer_rows, ids, plens,
                                 tolerance=self.cfg.rollout.logprob_tolerance)
            out["rollout_logprob_abs_diff"] = out["rollout_logprob_abs_diff_max"]
        return broadcast_object(out)

