"""Typed knobs of the algorithms (pure dataclasses: no I/O, no Megatron).

Names follow the papers (see docs/algorithms.md for the mapping). The algo helper owns this file.
Every SCPO knob is part of our *reconstruction* of SmartThinker-v1 (the method section was unavailable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

MethodName = Literal["scpo", "lapo_stage1", "lapo_stage2", "calibration", "grpo", "global_length_penalty"]


def _check_range(obj: object, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True) -> None:
    v = getattr(obj, name)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {v}")


@dataclass
class ClipConfig:
    """Clip range of the ratio: constant, or difficulty-adaptive per prompt (SCPO, reconstructed rule).

    ``adaptive: false``: the constant range ``eps_low`` / ``eps_high`` (null: 0.2, PPO's).
    ``adaptive: true``: eps(q) = eps_min + (eps_max - eps_min) * p(q), p = group accuracy (1 - p with ``invert``),
    from ``eps_low_min/max`` and ``eps_high_min/max`` (null: 0.1 / 0.3).
    A key of the other mode would do nothing, so setting it is an error (``eps_low`` with adaptive, the
    ``*_min/max`` keys or ``invert: true`` without). Read the resolved numbers through ``fixed()`` / ``ranges()``.
    """

    eps_low: float | None = None
    eps_high: float | None = None
    adaptive: bool = False
    eps_low_min: float | None = None
    eps_low_max: float | None = None
    eps_high_min: float | None = None
    eps_high_max: float | None = None
    invert: bool = False
    dual_clip: float | None = 3.0  # c > 1: dual-clip for negative advantages (verl's clip_ratio_c = 3); null = off

    def fixed(self) -> tuple[float, float]:
        """(eps_low, eps_high) of the constant range (adaptive: false)."""
        return (_or(self.eps_low, _EPS), _or(self.eps_high, _EPS))

    def ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((eps_low_min, eps_low_max), (eps_high_min, eps_high_max)) of the adaptive range (adaptive: true)."""
        return ((_or(self.eps_low_min, _EPS_MIN), _or(self.eps_low_max, _EPS_MAX)),
                (_or(self.eps_high_min, _EPS_MIN), _or(self.eps_high_max, _EPS_MAX)))

    def validate(self) -> None:
        if self.adaptive:
            inactive, why = ("eps_low", "eps_high"), "adaptive: true (eps_low_min/max, eps_high_min/max set the range)"
        else:
            inactive, why = ("eps_low_min", "eps_low_max", "eps_high_min", "eps_high_max"), "adaptive: false"
        for name in inactive:
            if getattr(self, name) is not None:
                raise ValueError(f"{name} does nothing with {why}; remove it")
        if self.invert and not self.adaptive:
            raise ValueError("invert does nothing without adaptive: true")
        (lo_min, lo_max), (hi_min, hi_max) = self.ranges()
        values = {"eps_low": self.fixed()[0], "eps_high": self.fixed()[1], "eps_low_min": lo_min, "eps_low_max": lo_max,
                  "eps_high_min": hi_min, "eps_high_max": hi_max}
        for name, v in values.items():
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if lo_min > lo_max:
            raise ValueError(f"eps_low_min ({lo_min}) must be <= eps_low_max ({lo_max})")
        if hi_min > hi_max:
            raise ValueError(f"eps_high_min ({hi_min}) must be <= eps_high_max ({hi_max})")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")


_EPS, _EPS_MIN, _EPS_MAX = 0.2, 0.1, 0.3  # ClipConfig's documented nulls


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


@dataclass
class LossConfig:
    """Policy-loss aggregation and regularizers."""

    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0  # k3 KL to the reference policy, 0 disables the reference pass
    tis_cap: float | None = None  # truncated importance sampling cap (rollout vs trainer log-probs)
    # constant normalizer of seq-mean-token-sum-norm (Dr.GRPO: the generation budget). null: the experiment
    # config sets it to rollout.max_new_tokens, and any other value is an error there (megatron_scpo/config.py)
    norm_length: int | None = None

    def validate(self) -> None:
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {self.kl_coef}")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap > 0):
            raise ValueError(f"tis_cap must be a finite number > 0 or null, got {self.tis_cap}")
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"norm_length must be > 0, got {self.norm_length}")


@dataclass
class AdvantageConfig:
    """Group normalization of sequence rewards (GRPO); scale_std=false is Dr.GRPO."""

    scale_std: bool = True
    unbiased_std: bool = True  # torch.std default, as in verl / OpenRLHF group_norm
    eps: float = 1e-6

    def validate(self) -> None:
        _check_range(self, "eps", 0.0, 1.0, lo_open=True)


@dataclass
class SegmentationConfig:
    """Reasoning text -> steps (reconstructed SCPO segmentation)."""

    # regex; the delimiter stays with the step it ends. A blank line, except right after a colon: a lead-in
    # ("We can write this as:") and the display equation after it form one step (docs/data.md: on CHAMP's
    # human-marked first wrong steps 93% of spans fall inside one step, 69% with a plain "\n\n"; the
    # synthetic task segments identically).
    delimiter: str = r"(?<!:)\n\n"
    min_step_tokens: int = 5  # shorter steps merge into the previous one
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_marker: str = r"\boxed{"  # without think_close: the line of the last marker starts the answer step

    def validate(self) -> None:
        import re

        if not self.delimiter:
            raise ValueError("delimiter must be a non-empty regex")
        try:
            re.compile(self.delimiter)
        except re.error as e:
            raise ValueError(f"delimiter {self.delimiter!r} is not a valid regex: {e}") from None
        if self.min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be >= 1, got {self.min_step_tokens}")


@dataclass
class ImportanceConfig:
    """SCPO online importance estimator (reconstructed): teacher-forced answer log-probs per prefix."""

    mode: Literal["prefix_gain", "leave_one_out"] = "prefix_gain"
    normalize: Literal["minmax", "softmax"] = "minmax"
    temperature: float | None = None  # softmax temperature (null: 1.0); does nothing with minmax: an error there
    max_scored_steps: int = 16  # adjacent steps merge so at most this many units are scored per response
    forcing_suffix: str = "\n</think>\n\nThe answer is \\boxed{"
    answer_closing: str = "}"
    answer_step_importance: float = 1.0  # the answer step is never scored: it holds the answer itself

    def softmax_temperature(self) -> float:
        """The softmax temperature with the documented null (1.0) resolved."""
        return _or(self.temperature, 1.0)

    def validate(self) -> None:
        if self.normalize != "softmax" and self.temperature is not None:
            raise ValueError(f"temperature does nothing with normalize: {self.normalize}; remove it")
        t = self.softmax_temperature()
        if not 0.0 < t < float("inf"):
            raise ValueError(f"temperature must be in (0.0, inf), got {t}")
        if self.max_scored_steps < 1:
            raise ValueError(f"max_scored_steps must be >= 1, got {self.max_scored_steps}")
        _check_range(self, "answer_step_importance", 0.0, 1.0, hi_open=False)


@dataclass
class ScpoConfig:
    """SCPO step-level length-control reward + S-GAE (reconstructed from the survey row, see docs).

    correct:   r_j = (1 - k1*sigmoid((1-w_j) z(l_j))) * (1 - k2*sigmoid(z(L)))
    incorrect: r_j = -exp(-rho * (K - j) / k0)   (k0 = K when null)

    Advantage forms (docs/algorithms.md "Invariants", "Choice of the length term"):

    - ``split`` (default): A = A_outcome (GRPO on correctness) + A_len on correct responses, with
      A_len_j = b * tanh(len_coef * D_j / b), D_j the discounted ``reduce`` (sum / mean, decay gamma*lam) of the
      step rewards standardized over the group's correct steps, and b = len_gap_frac * g_min, g_min the smallest
      correct-vs-wrong gap of A_outcome over all groups (``min_outcome_gap``). |A_len| < b < g_min, so a correct
      response always ends above every wrong one (a bare std-normalized sum did not: issue 11 item 1).
    - ``critic``: the same, with D_j = GAE of the centred correct step rewards against critic values.
    - ``s_gae``: one S-GAE over all step rewards of the group; needs ``reduce: mean`` (a discounted average of
      the response's own steps, whose rewards are > 0 if correct and < 0 if wrong, so correct >= wrong holds;
      the summed form pays once per step and can rank a long correct response below a wrong one).

    Every form gives zero advantage to a group of one sample and to an all-wrong group.
    """

    k1: float = 0.5
    k2: float = 0.5
    rho: float = 1.0
    k0: float | None = None
    advantage: Literal["s_gae", "split", "critic"] = "split"
    gamma: float = 1.0
    lam: float = 0.5  # S-GAE decays by gamma*lam per step (0.5: horizon of a few steps; 1 was unstable with split)
    reduce: Literal["sum", "mean"] = "sum"  # mean: discounted average instead of discounted sum
    len_coef: float = 1.0  # split/critic: slope of A_len at 0 (A_len ~ len_coef * D for small D)
    len_gap_frac: float = 0.9  # split/critic: |A_len| < len_gap_frac * min_outcome_gap (1.27 with default GRPO)
    std_eps: float = 1e-6
    # noise floors (ours): a +-1-token difference in a group of near-equal lengths is not a length signal.
    length_sd_floor: float = 0.1  # z(l) and z(L) divide by max(sd, length_sd_floor * mean)
    std_floor: float = 0.05  # step rewards are standardized by max(std, std_floor) (reward units; range <= 1)

    def validate(self) -> None:
        _check_range(self, "k1", 0.0, 1.0, hi_open=False)
        _check_range(self, "k2", 0.0, 1.0, hi_open=False)
        _check_range(self, "rho", 0.0, float("inf"))
        if self.k0 is not None and self.k0 <= 0:
            raise ValueError(f"k0 must be > 0 or null, got {self.k0}")
        _check_range(self, "gamma", 0.0, 1.0, hi_open=False)
        _check_range(self, "lam", 0.0, 1.0, hi_open=False)
        _check_range(self, "len_coef", 0.0, float("inf"))
        _check_range(self, "len_gap_frac", 0.0, 1.0)
        _check_range(self, "std_eps", 0.0, 1.0, lo_open=True)
        _check_range(self, "length_sd_floor", 0.0, 1.0, hi_open=False)
        _check_range(self, "std_floor", 0.0, 1.0)
        if self.advantage == "s_gae" and self.reduce != "mean":
            raise ValueError(
                "advantage s_gae needs reduce: mean (the summed form pays a correct response once per step and can "
                "rank a long correct response below a wrong one; docs/algorithms.md)"
            )


@dataclass
class LapoConfig:
    """LAPO (Wu et al. 2507.15758): stage-1 length band, stage-2 budget prompt + Gaussian adherence."""

    alpha: float = 0.7  # stage-1 length-reward weight
    beta: float = 0.8  # stage-2 weight (code 0.8; paper section 5 says 0.7)
    sigma: float = 120.0  # stage-2 Gaussian width (code only)
    band_low_pct: float = 30.0
    band_high_pct: float = 70.0
    decay_width: float = 100.0  # stage-1 bonus decays linearly to 0 this many tokens outside the band
    default_budget: int = 4096  # M(q) of unsolved prompts
    budget_template: str = " I will answer the question with {n} tokens."  # inserted after segmentation.think_open

    def validate(self) -> None:
        _check_range(self, "alpha", 0.0, float("inf"))
        _check_range(self, "beta", 0.0, float("inf"))
        _check_range(self, "sigma", 0.0, float("inf"), lo_open=True)
        _check_range(self, "decay_width", 0.0, float("inf"), lo_open=True)
        if not 0.0 <= self.band_low_pct <= self.band_high_pct <= 100.0:
            raise ValueError(
                f"need 0 <= band_low_pct <= band_high_pct <= 100, got {self.band_low_pct}, {self.band_high_pct}"
            )
        if self.default_budget <= 0:
            raise ValueError(f"default_budget must be > 0, got {self.default_budget}")
        if "{n}" not in self.budget_template:
            raise ValueError(f"budget_template must contain '{{n}}', got {self.budget_template!r}")


@dataclass
class CalibrationConfig:
    """Progressive length calibration (Hu et al. 2603.08000): Gaussian l_opt, ReLU penalty, dynamic Lambda."""

    variance: Literal["population", "unbiased"] = "population"  # sync code: population; async: unbiased
    normalize: Literal["combined", "accuracy"] = "combined"  # std of r (sync) or of r_acc (async)
    eps: float = 1e-6

    def validate(self) -> None:
        _check_range(self, "eps", 0.0, 1.0, lo_open=True)


@dataclass
class LengthPenaltyConfig:
    """Global length penalty baselines: Arora-Zanette sigmoid (group-normalized) or Kimi k1.5."""

    style: Literal["arora_zanette", "kimi"] = "arora_zanette"
    alpha: float = 0.2  # arora_zanette: r = S * (1 - alpha * sigmoid(z(L)))
    kimi_weight: float = 1.0  # kimi: r = S + weight * lambda_len; <= 2 keeps every correct r >= 0 >= every wrong r

    def validate(self) -> None:
        _check_range(self, "alpha", 0.0, 1.0, hi_open=False)
        _check_range(self, "kimi_weight", 0.0, 2.0, hi_open=False)

    def correct_floor(self) -> float:
        """Lower bound of a correct response's reward (a wrong one's is <= 0): 1 - alpha or 1 - kimi_weight/2."""
        return 1.0 - self.alpha if self.style == "arora_zanette" else 1.0 - 0.5 * self.kimi_weight


@dataclass
class OverlongConfig:
    """DAPO soft overlong punishment, added to the sequence reward (grpo, global_length_penalty, lapo_*).

    ``max_length`` is L_max of DAPO, the generation limit: null (default) takes rollout.max_new_tokens in the
    experiment config, which also rejects any other value (a window below the limit punished complete
    responses as if they were cut off: issue 11 item 8). Standalone AlgoConfig users set it themselves.
    ``cache_length`` (null: 512) and ``penalty_factor`` (null: 1.0) shape the window; they do nothing without
    ``enabled: true``, so setting them then is an error. Read the resolved pair through ``window()``.
    """

    enabled: bool = False
    max_length: int | None = None
    cache_length: int | None = None
    penalty_factor: float | None = None

    def window(self) -> tuple[int, float]:
        """(cache_length, penalty_factor) with the documented nulls resolved."""
        return (int(_or(self.cache_length, 512)), _or(self.penalty_factor, 1.0))

    def validate(self) -> None:
        """The one home of the window rule: ``0 < cache_length < max_length`` (a window as long as the limit
        starts punishing at length 0). The experiment config re-runs this once it has derived max_length."""
        if not self.enabled:
            for name in ("cache_length", "penalty_factor"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does nothing without enabled: true; remove it")
        cache, factor = self.window()
        if self.enabled and self.max_length is not None and not cache < self.max_length:
            raise ValueError(f"cache_length ({cache}) must be < max_length ({self.max_length}, the generation limit)")
        if cache <= 0:
            raise ValueError(f"cache_length must be > 0, got {cache}")
        if not 0.0 <= factor < float("inf"):
            raise ValueError(f"penalty_factor must be in [0.0, inf), got {factor}")


def min_outcome_gap(adv: AdvantageConfig) -> float:
    """Smallest difference between a correct and a wrong response's GRPO advantage over every group size >= 2.

    A_correct - A_wrong = 1 / (std + eps) with std of the 0/1 rewards: population std <= 1/2, unbiased std
    <= sqrt(G / (4 (G - 1))) <= sqrt(1/2) (G = 2, one of each); 1 without std scaling (Dr.GRPO).
    """
    if not adv.scale_std:
        return 1.0
    sd_max = 0.5 ** 0.5 if adv.unbiased_std else 0.5
    return 1.0 / (sd_max + adv.eps)


@dataclass
class AlgoConfig:
    """Which method, and the method's knobs."""

    method: MethodName = "scpo"
    clip: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    scpo: ScpoConfig = field(default_factory=ScpoConfig)
    lapo: LapoConfig = field(default_factory=LapoConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)

    def validate(self) -> None:
        """Cross-section checks that keep the invariant "every correct response >= every wrong one" provable."""
        if self.overlong.enabled and self.method in ("scpo", "calibration"):
            raise ValueError(
                f"overlong.enabled is not supported with method {self.method!r} (it would break the method's "
                "reward invariants); use grpo, global_length_penalty, lapo_stage1 or lapo_stage2"
            )
        if self.overlong.enabled:
            floor = self.length_penalty.correct_floor() if self.method == "global_length_penalty" else 1.0
            factor = self.overlong.window()[1]
            if factor > floor + 1e-12:
                raise ValueError(
                    f"overlong.penalty_factor ({factor}) must be <= {floor:.6g} with method "
                    f"{self.method!r}: a larger penalty can push a correct response's reward below a wrong one's"
                )


def validate_all(cfg: AlgoConfig) -> None:
    """Every section's ``validate()``, then ``AlgoConfig.validate()``: the checks loading a YAML runs, for a
    hand-built config (``build_method`` calls this). Raises ValueError naming the key (``algo.scpo: ...``)."""
    for f in fields(cfg):
        check = getattr(getattr(cfg, f.name), "validate", None)
        if callable(check):
            try:
                check()
            except ValueError as e:
                raise ValueError(f"algo.{f.name}: {e}") from None
    cfg.validate()
