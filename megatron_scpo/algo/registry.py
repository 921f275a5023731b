"""The trainer's one entry point: ``build_method(cfg, scan=...)`` -> a Method (reward + advantage + clip policy).

The trainer fills a ``GroupedRollouts`` (B samples, G per prompt, flattened; any group order), calls
``method.compute(rollouts)`` and feeds ``MethodOutput.advantages / eps_low / eps_high`` to
``losses.policy_loss``. LAPO's length map lives in the method and travels with ``state_dict()``.
``scan`` is S-GAE's discounted scan (``advantages.DiscountedScan``): the spec by default, the kernel op
(``scpo_kernels.gae.step_discounted_sum``) in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from megatron_scpo.algo.advantages import (
    DiscountedScan,
    bounded,
    broadcast_to_tokens,
    discounted_reverse_sum,
    s_gae,
    s_gae_critic,
    values_at_step_starts,
)
from megatron_scpo.algo.clipping import adaptive_clip
from megatron_scpo.algo.config import AlgoConfig, min_outcome_gap, validate_all
from megatron_scpo.algo.groups import check_finite, group_index, group_normalize, masked_group_stats
from megatron_scpo.algo.rewards.baselines import (
    accuracy_reward,
    arora_zanette_reward,
    kimi_length_reward,
    overlong_penalty,
)
from megatron_scpo.algo.rewards.calibration import calibration_advantages, calibration_rewards
from megatron_scpo.algo.rewards.lapo import LengthMap, augment_prompt, lapo_stage1_rewards, lapo_stage2_rewards
from megatron_scpo.algo.rewards.scpo import scpo_step_rewards
from megatron_scpo.algo.steps import step_lengths_batch


@dataclass
class GroupedRollouts:
    """One RL batch after verification and segmentation (pure tensors + lists).

    group_ids [B] long: samples with the same id answer the same prompt.
    correct [B] bool; response_lengths [B] long (tokens, the length every length reward uses);
    step_ids [B, T] long (-1 outside the response; 0..K_b-1 inside, contiguous);
    response_mask [B, T] bool (tokens that get an advantage); truncated [B] bool;
    prompt_keys: one stable key per sample (LAPO's map key); step_importance: per sample a float
    tensor [K_b] in [0, 1] (SCPO, correct samples) or None; values [B, T]: critic values (SCPO critic mode).
    """

    group_ids: Tensor
    correct: Tensor
    response_lengths: Tensor
    step_ids: Tensor
    response_mask: Tensor
    truncated: Tensor
    prompt_keys: list[str]
    step_importance: list[Tensor | None] | None = None
    values: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.group_ids.shape[0])

    def validate(self) -> None:
        """Raise ValueError naming the field when shapes or values are inconsistent."""
        B = self.group_ids.numel()
        if B == 0 or self.group_ids.dim() != 1:
            raise ValueError(f"group_ids must be a non-empty [B] tensor, got shape {tuple(self.group_ids.shape)}")
        for name in ("correct", "response_lengths", "truncated"):
            t = getattr(self, name)
            if t.shape != (B,):
                raise ValueError(f"{name} must be [B] = [{B}], got {tuple(t.shape)}")
        if bool((self.response_lengths < 0).any()):
            raise ValueError("response_lengths must be >= 0")
        if self.step_ids.dim() != 2 or self.step_ids.shape[0] != B:
            raise ValueError(f"step_ids must be [B={B}, T], got {tuple(self.step_ids.shape)}")
        if self.response_mask.shape != self.step_ids.shape:
            raise ValueError(
                f"response_mask {tuple(self.response_mask.shape)} must match step_ids {tuple(self.step_ids.shape)}"
            )
        if len(self.prompt_keys) != B:
            raise ValueError(f"prompt_keys must have B = {B} entries, got {len(self.prompt_keys)}")
        if self.step_importance is not None and len(self.step_importance) != B:
            raise ValueError(f"step_importance must have B = {B} entries, got {len(self.step_importance)}")
        if self.values is not None and self.values.shape != self.step_ids.shape:
            raise ValueError(f"values must be [B, T] = {tuple(self.step_ids.shape)}, got {tuple(self.values.shape)}")


@dataclass
class MethodOutput:
    """What the loss needs: token advantages [B, T] (0 outside the mask), per-sample clip ranges, metrics."""

    advantages: Tensor
    rewards: Tensor  # [B] sequence-level reward (SCPO: mean step reward)
    eps_low: Tensor
    eps_high: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    name: str
    needs_importance: bool

    def prepare_prompt(self, prompt: str, key: str) -> str: ...

    def compute(self, r: GroupedRollouts) -> MethodOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


def _batch_metrics(r: GroupedRollouts) -> dict[str, float]:
    inv, n = group_index(r.group_ids)
    acc, _, _ = masked_group_stats(r.correct.to(torch.float64), inv, n)
    L = r.response_lengths.to(torch.float64)
    c = r.correct.bool()
    return {
        "length/correct_mean": float(L[c].mean()) if bool(c.any()) else 0.0,
        "truncated/frac": float(r.truncated.to(torch.float64).mean()),
        "groups/count": float(n),
        "groups/all_correct_frac": float((acc == 1.0).to(torch.float64).mean()),
        "groups/all_wrong_frac": float((acc == 0.0).to(torch.float64).mean()),
    }


class MethodBase:
    """Shared plumbing: validation, clip policy, NaN guard, common metrics; subclasses define ``_advantages``.

    ``scan``: the discounted scan of step-level advantages (S-GAE; only ``scpo`` has steps to scan).
    """

    name = "base"
    needs_importance = False

    def __init__(self, cfg: AlgoConfig, scan: DiscountedScan = discounted_reverse_sum) -> None:
        self.cfg = cfg
        self.scan = scan

    def prepare_prompt(self, prompt: str, key: str) -> str:
        return prompt

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        return None

    def _advantages(self, r: GroupedRollouts) -> tuple[Tensor, Tensor, dict[str, float]]:
        """-> (token advantages [B, T], sequence rewards [B], metrics)."""
        raise NotImplementedError

    def compute(self, r: GroupedRollouts) -> MethodOutput:
        r.validate()
        adv, rewards, metrics = self._advantages(r)
        check_finite(f"{self.name}: rewards", rewards)
        check_finite(f"{self.name}: advantages", adv)
        adv = torch.where(r.response_mask.bool(), adv.to(torch.float32), torch.zeros((), dtype=torch.float32))
        eps_low, eps_high = adaptive_clip(r.correct, r.group_ids, self.cfg.clip)
        m = r.response_mask.bool()
        out_metrics = _batch_metrics(r)
        rw = rewards.to(torch.float64)
        out_metrics.update(
            {
                "reward/mean": float(rw.mean()),
                "reward/std": float(rw.std(unbiased=False)),
                "adv/mean": float(adv[m].mean()) if bool(m.any()) else 0.0,
                "adv/abs_mean": float(adv[m].abs().mean()) if bool(m.any()) else 0.0,
                "clip/eps_low_mean": float(eps_low.mean()),
                "clip/eps_high_mean": float(eps_high.mean()),
            }
        )
        out_metrics.update(metrics)
        return MethodOutput(adv, rewards.to(torch.float32), eps_low, eps_high, out_metrics)


class SequenceRewardMethod(MethodBase):
    """A scalar reward per response, optional DAPO overlong shaping, then GRPO group normalization."""

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def _advantages(self, r: GroupedRollouts) -> tuple[Tensor, Tensor, dict[str, float]]:
        rewards, metrics = self._rewards(r)
        ol = self.cfg.overlong
        if ol.enabled:
            if ol.max_length is None:
                raise ValueError("overlong.enabled needs overlong.max_length (the experiment config sets it to "
                                 "rollout.max_new_tokens)")
            pen = overlong_penalty(r.response_lengths, ol.max_length, *ol.window())
            metrics["overlong/penalty_mean"] = float(pen.mean())
            rewards = rewards + pen
        check_finite(f"{self.name}: rewards", rewards)
        a = self.cfg.advantage
        seq_adv = group_normalize(rewards, r.group_ids, scale_std=a.scale_std, unbiased=a.unbiased_std, eps=a.eps)
        return seq_adv[:, None].expand_as(r.step_ids).to(torch.float64), rewards, metrics


class GrpoMethod(SequenceRewardMethod):
    """Accuracy-only GRPO (Dr.GRPO with advantage.scale_std=false); DAPO overlong shaping optional."""

    name = "grpo"

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        return accuracy_reward(r.correct), {}


class GlobalLengthPenaltyMethod(SequenceRewardMethod):
    """Global (response-level) length penalty baseline: Arora-Zanette sigmoid or Kimi k1.5."""

    name = "global_length_penalty"

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        lp = self.cfg.length_penalty
        if lp.style == "arora_zanette":
            return arora_zanette_reward(r.correct, r.response_lengths, r.group_ids, lp.alpha, r.truncated), {}
        return kimi_length_reward(r.correct, r.response_lengths, r.group_ids, lp.kimi_weight), {}


def _group_keys(r: GroupedRollouts) -> dict[int, tuple[str, list[int]]]:
    """group id -> (prompt key, sample indices); a group must share one key."""
    out: dict[int, tuple[str, list[int]]] = {}
    for i, g in enumerate(r.group_ids.tolist()):
        key = r.prompt_keys[i]
        if g in out:
            if out[g][0] != key:
                raise ValueError(f"group {g} mixes prompt_keys {out[g][0]!r} and {key!r}")
            out[g][1].append(i)
        else:
            out[g] = (key, [i])
    return out


class LapoMethodBase(SequenceRewardMethod):
    """LAPO stages share the length map (stage 1 writes it, stage 2 reads and refines it)."""

    def __init__(self, cfg: AlgoConfig, scan: DiscountedScan = discounted_reverse_sum) -> None:
        super().__init__(cfg, scan)
        self.length_map = LengthMap(cfg.lapo.default_budget)

    def state_dict(self) -> dict[str, Any]:
        return {"length_map": self.length_map.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """An empty dict means "no saved state" (fresh map); a non-empty one must hold the map."""
        if not d:
            return
        if "length_map" not in d:
            raise ValueError(f"{self.name}: state dict has no 'length_map' (keys: {sorted(d)})")
        self.length_map.load_state_dict(d["length_map"])

    def _map_metrics(self) -> dict[str, float]:
        return {"lapo/map_size": float(len(self.length_map))}


class LapoStage1Method(LapoMethodBase):
    """LAPO-D: R = C + alpha * band bonus; M(q) <- median correct length after every step."""

    name = "lapo_stage1"

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        lc = self.cfg.lapo
        rewards, bands = lapo_stage1_rewards(
            r.correct, r.response_lengths, r.group_ids, alpha=lc.alpha, low_pct=lc.band_low_pct,
            high_pct=lc.band_high_pct, decay_width=lc.decay_width, truncated=r.truncated,
        )
        ok = r.correct.bool() & ~r.truncated.bool()  # a truncated response's capped length defines no optimum
        for _g, (key, idx) in _group_keys(r).items():
            self.length_map.set_stage1(key, [float(r.response_lengths[i]) for i in idx if ok[i]])
        widths = [b[1] - b[0] for b in bands.values() if b is not None]
        metrics = self._map_metrics()
        metrics["lapo/band_frac"] = len(widths) / max(len(bands), 1)
        metrics["lapo/band_width_mean"] = sum(widths) / len(widths) if widths else 0.0
        return rewards, metrics


class LapoStage2Method(LapoMethodBase):
    """LAPO-I: budget statement in the prompt, Gaussian adherence reward, dual-rule map refinement.

    The target of a sample is the budget its prompt stated (the map before this step's refinement);
    for an unsolved prompt it is the group's median correct length (authors' code). Truncated responses
    never set the target nor refine the map.
    """

    name = "lapo_stage2"

    def prepare_prompt(self, prompt: str, key: str) -> str:
        return augment_prompt(prompt, self.length_map.budget(key), self.cfg.lapo.budget_template,
                              self.cfg.segmentation.think_open)

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        lc = self.cfg.lapo
        c = r.correct.bool()
        ok = c & ~r.truncated.bool()
        L = r.response_lengths.to(torch.float64)
        targets = torch.zeros_like(L)
        solved = 0
        groups = _group_keys(r)
        for _g, (key, idx) in groups.items():
            correct_l = [float(L[i]) for i in idx if ok[i]]
            if self.length_map.is_solved(key):
                n = float(self.length_map.budget(key))
                solved += 1
            elif correct_l:
                n = float(torch.tensor(correct_l, dtype=torch.float64).quantile(0.5))
            else:
                n = float(self.length_map.default_budget)
            targets[idx] = n
        rewards = lapo_stage2_rewards(r.correct, r.response_lengths, targets, beta=lc.beta, sigma=lc.sigma)
        for _g, (key, idx) in groups.items():
            self.length_map.refine(key, [float(L[i]) for i in idx if ok[i]])
        metrics = self._map_metrics()
        metrics["lapo/target_mean"] = float(targets.mean())
        metrics["lapo/solved_frac"] = solved / max(len(groups), 1)
        ok = c & (r.response_lengths.to(torch.float64) <= targets)
        metrics["lapo/within_budget_frac"] = float(ok.to(torch.float64).sum() / c.sum().clamp(min=1))
        return rewards, metrics


class CalibrationMethod(MethodBase):
    """Progressive length calibration: Gaussian l_opt, one-sided ReLU penalty, dynamic Lambda, GRPO."""

    name = "calibration"

    def _advantages(self, r: GroupedRollouts) -> tuple[Tensor, Tensor, dict[str, float]]:
        cc = self.cfg.calibration
        rewards, d, lam, lopt = calibration_rewards(
            r.correct, r.response_lengths, r.group_ids, variance=cc.variance, eps=cc.eps, truncated=r.truncated
        )
        adv = calibration_advantages(rewards, r.correct, r.group_ids, normalize=cc.normalize, eps=cc.eps)
        inv, n = group_index(r.group_ids)
        first = torch.zeros(n, dtype=torch.long).scatter_(0, inv, torch.arange(inv.numel()))
        metrics = {
            "calib/l_opt_mean": float(lopt[first].mean()),
            "calib/lambda_mean": float(lam[first].mean()),
            "calib/penalized_frac": float((d > 0).to(torch.float64).mean()),
        }
        return adv[:, None].expand_as(r.step_ids), rewards, metrics


class ScpoMethod(MethodBase):
    """SCPO (reconstructed): step rewards from importance-weighted step lengths; split (default) / S-GAE / critic."""

    name = "scpo"
    needs_importance = True

    def _importance(self, r: GroupedRollouts, num_steps: Tensor, K: int) -> Tensor:
        w = torch.zeros(r.batch_size, K, dtype=torch.float64)
        imp = r.step_importance
        for b in range(r.batch_size):
            if not bool(r.correct[b]) or int(num_steps[b]) == 0:
                continue
            if imp is None or imp[b] is None:
                raise ValueError(f"scpo: sample {b} is correct but has no step_importance (run estimate_importance)")
            v = torch.as_tensor(imp[b], dtype=torch.float64).reshape(-1)
            if v.numel() != int(num_steps[b]):
                raise ValueError(f"scpo: sample {b} has {int(num_steps[b])} steps but {v.numel()} importances")
            w[b, : v.numel()] = v
        return w

    def _advantages(self, r: GroupedRollouts) -> tuple[Tensor, Tensor, dict[str, float]]:
        sc = self.cfg.scpo
        step_ids = torch.where(r.response_mask.bool(), r.step_ids, torch.full_like(r.step_ids, -1))
        lengths, num_steps = step_lengths_batch(step_ids)
        K = lengths.shape[1]
        mask = torch.arange(K)[None, :] < num_steps[:, None]
        w = self._importance(r, num_steps, K)
        step_r = scpo_step_rewards(lengths, mask, r.correct, r.group_ids, w, r.response_lengths, sc, r.truncated)
        c = r.correct.bool()
        cm = mask & c[:, None]  # the correct responses' steps
        inv, n = group_index(r.group_ids)
        gl = sc.gamma * sc.lam
        a_len = torch.zeros_like(step_r)
        if sc.advantage == "s_gae":  # reduce is mean (ScpoConfig.validate, run by build_method)
            step_a = s_gae(step_r, mask, r.group_ids, gamma_lambda=gl, reduce=sc.reduce, eps=sc.std_eps,
                           std_floor=sc.std_floor, scan=self.scan)
        else:
            a = self.cfg.advantage
            outcome = group_normalize(c.to(torch.float64), r.group_ids, scale_std=a.scale_std,
                                      unbiased=a.unbiased_std, eps=a.eps)
            if sc.advantage == "split":
                s = s_gae(step_r, cm, r.group_ids, gamma_lambda=gl, reduce=sc.reduce, eps=sc.std_eps,
                          std_floor=sc.std_floor, scan=self.scan)
            else:
                if r.values is None:
                    raise ValueError("scpo.advantage=critic needs GroupedRollouts.values (critic values [B, T])")
                gid = inv[:, None].expand_as(step_r)
                mean, _, _ = masked_group_stats(step_r, gid, n, cm)
                v = values_at_step_starts(r.values.to(torch.float64), step_ids, K)
                s, _ = s_gae_critic(torch.where(cm, step_r - mean[gid], torch.zeros_like(step_r)), v, cm,
                                    gamma=sc.gamma, lam=sc.lam, scan=self.scan)
            bound = sc.len_gap_frac * min_outcome_gap(a)  # < every correct-vs-wrong gap of `outcome`
            a_len = torch.where(cm, bounded(s, bound, sc.len_coef), torch.zeros_like(s))
            step_a = (outcome[:, None] + a_len) * mask
        # DESIGN.md 3: a group whose samples all get the same reward carries no signal. One sample has no baseline;
        # all-wrong samples share the outcome (s_gae would otherwise rank their step penalties, even above 0).
        acc, _, cnt = masked_group_stats(c.to(torch.float64), inv, n)
        silent = ((cnt < 2) | (acc == 0))[inv]
        step_a = torch.where(silent[:, None], torch.zeros_like(step_a), step_a)
        adv = broadcast_to_tokens(step_a, step_ids)
        nsteps = mask.sum(dim=1).clamp(min=1)
        seq_r = step_r.sum(dim=1) / nsteps
        metrics = {
            "steps/mean": float(num_steps.to(torch.float64).mean()),
            "steps/len_mean": float(lengths[mask].to(torch.float64).mean()) if bool(mask.any()) else 0.0,
            "importance/low_frac": float((w[cm] < 0.5).to(torch.float64).mean()) if bool(cm.any()) else 0.0,
            "step_reward/correct_mean": float(step_r[cm].mean()) if bool(cm.any()) else 0.0,
            "step_reward/wrong_mean": float(step_r[mask & ~c[:, None]].mean()) if bool((mask & ~c[:, None]).any())
            else 0.0,
            "adv/len_abs_mean": float(a_len[cm].abs().mean()) if bool(cm.any()) else 0.0,
        }
        return adv, seq_r, metrics


METHODS: dict[str, Callable[[AlgoConfig, DiscountedScan], Method]] = {
    "scpo": ScpoMethod,
    "lapo_stage1": LapoStage1Method,
    "lapo_stage2": LapoStage2Method,
    "calibration": CalibrationMethod,
    "grpo": GrpoMethod,
    "global_length_penalty": GlobalLengthPenaltyMethod,
}


def build_method(cfg: AlgoConfig, scan: DiscountedScan = discounted_reverse_sum) -> Method:
    """Config -> method object (one per run; keep it: LAPO carries state across steps).

    Validates ``cfg`` first (every section, then the cross-section rules), so a hand-built AlgoConfig meets
    the checks a loaded YAML meets; raises ValueError naming the field. ``scan``: S-GAE's discounted scan
    (``DiscountedScan``; default the spec, the trainer passes ``scpo_kernels.gae.step_discounted_sum``).
    """
    try:
        factory = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"algo.method {cfg.method!r} is not implemented; choose one of {sorted(METHODS)}") from None
    validate_all(cfg)
    return factory(cfg, scan)
