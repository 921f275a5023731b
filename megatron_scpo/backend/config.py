"""Model and parallelism sections of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """Where the policy comes from: an HF checkpoint dir, or an HF config to build a fresh model."""

    hf_path: str | None = None  # HF model dir (config.json + safetensors + tokenizer)
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class ParallelConfig:
    """Megatron parallel layout; DP is what remains of the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline chunks per PP stage (interleaved 1F1B); 1 = off
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # Packed sequences (verl use_remove_padding; Megatron THD / PackedSeqParams): every log-prob and training
    # pass of the run (RL old/ref log-probs, SCPO importance scoring, policy and SFT steps) concatenates a
    # micro-batch's sequences into one row with no padding between them; attention never crosses a sequence
    # boundary and RoPE positions restart at 0 per sequence. Same numbers as the padded layout (tested, fp32).
    packed_sequences: bool = True
    # Token budget per micro-batch (verl use_dynamic_bsz, slime --max-tokens-per-gpu): real tokens (prompt +
    # response) per micro-batch, rows balanced over the fewest micro-batches that fit it. Replaces the
    # sequence count of the section's micro_batch_size (rl / sft / rejection_sft) in every backend pass.
    # null: fixed micro_batch_size sequences per micro-batch. With pp > 1 it needs packed_sequences.
    max_tokens_per_micro_batch: int | None = None

    def validate(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.vpp < 1:
            raise ValueError(f"tp, pp and vpp must be >= 1, got tp={self.tp} pp={self.pp} vpp={self.vpp}")
        if self.max_tokens_per_micro_batch is not None:
            if self.max_tokens_per_micro_batch < 1:
                raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
            if self.pp > 1 and not self.packed_sequences:
                raise ValueError("max_tokens_per_micro_batch with pp > 1 needs packed_sequences: true (pipeline "
                                 "stages exchange one activation shape; padded micro-batches of varying rows "
                                 "would differ)")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp={self.vpp} needs pp > 1")
