"""The RL hyperparameters that the GRPO maths checks: one frozen, typed, validated dataclass.

Defaults are the MM-Eureka Qwen2.5-VL-7B recipe (see ../shared/DESIGN.md, "MM-Eureka recipe").
Frozen, so it is hashable and can be a static argument of `jax.jit`. It lives inside an
ml_collections config as a plain dict (`to_dict`) and is rebuilt and validated at start-up
(`RLConfig.from_dict(config.rl)`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import ml_collections

from eureka_jax.errors import InputError

AdvantageKind = Literal["grpo", "rloo", "dr_grpo"]
ScaleRewards = Literal["group", "batch", "none"]
LossKind = Literal["grpo", "dapo", "dr_grpo", "gspo", "cpgd"]
KLEstimator = Literal["k1", "k2", "k3"]
KLPlacement = Literal["loss", "reward"]

ADVANTAGE_KINDS: tuple[str, ...] = typing.get_args(AdvantageKind)
SCALE_REWARDS: tuple[str, ...] = typing.get_args(ScaleRewards)
LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)
KL_ESTIMATORS: tuple[str, ...] = typing.get_args(KLEstimator)
KL_PLACEMENTS: tuple[str, ...] = typing.get_args(KLPlacement)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO hyperparameters; formulas in eureka_jax/grpo.py."""

    # Samples per prompt (G). Rewards are normalised within each group of G.
    num_generations: int = 8

    # Advantage estimator: 'grpo' (group mean/std), 'rloo' (leave-one-out baseline, MM-Eureka v1),
    # 'dr_grpo' (group mean only).
    advantage: AdvantageKind = "grpo"
    # What 'grpo' advantages r - mean_G r are divided by (TRL's scale_rewards): 'group' the
    # group's unbiased std (MM-Eureka), 'batch' the unbiased std of all the rollout's rewards
    # (TRL / LitePPO), 'none' nothing ('grpo' with 'none' equals 'dr_grpo'). It must be 'none'
    # with 'dr_grpo' (unscaled by definition) and 'rloo' (MM-Eureka v1 whitens RLOO advantages
    # over the training batch instead: whiten_advantages).
    scale_rewards: ScaleRewards = "group"
    # Added to the std before dividing: MM-Eureka uses std + 1e-9 (torch's unbiased std); TRL
    # uses 1e-4.
    adv_eps: float = 1e-9
    # Whiten the advantages of each step's training batch (the groups one step trains on),
    # weighted by response length: OpenRLHF's per-token replay-buffer normalisation, which
    # MM-Eureka v1 applied to its RLOO advantages (rollout.whiten_training_batch).
    whiten_advantages: bool = False

    # Policy loss: 'grpo' (per-sequence token mean, MM-Eureka), 'dapo' (token mean over the batch),
    # 'dr_grpo' (token sum / (sequences * max_response_length)), 'gspo' (sequence-level ratio),
    # 'cpgd' (clamped log-prob + policy drift).
    loss: LossKind = "grpo"
    # PPO clip range [1 - clip_eps_low, 1 + clip_eps_high]; DAPO's clip-higher uses high = 0.28.
    # cpgd clamps the log-prob to [old + log(1 - low), old + log(1 + high)] instead.
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    # MM-Eureka caps the importance ratio at 3.0 before clipping (no gradient above the cap), which
    # bounds the update of tokens with negative advantage. None disables the cap; cpgd, which
    # clamps log-probs, ignores it. It must exceed 1 + clip_eps_high, or it would cut ratios that
    # the clip keeps and so change the clipped objective itself.
    ratio_cap: float | None = 3.0
    # Weight of CPGD's policy-drift term min(ratio - 1, 2) * logp.
    cpgd_drift_coef: float = 0.01

    # KL to the reference policy. 0 means no reference model is kept (all MM-Eureka 7B scripts).
    kl_coef: float = 0.0
    # Estimator on d = ref_logp - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1.
    kl_estimator: KLEstimator = "k3"
    # 'loss': added to the loss (GRPO/TRL; the update step runs the reference forward);
    # 'reward': at rollout time, kl_coef * the sequence's summed KL of the sampled tokens is
    # subtracted from its reward before the advantages (OpenRLHF; grpo.kl_reward_penalty), and
    # the loss has no KL term.
    kl_placement: KLPlacement = "loss"
    # Entropy bonus: the loss gets -entropy_coef * H, with the token entropies aggregated like the
    # policy term (so under 'dr_grpo' H is scaled by mean length / max_response_length). The
    # logged `entropy` metric is the plain token mean whatever the loss.
    entropy_coef: float = 0.0

    # Online filter: keep a prompt only if its group's mean accuracy is in [filter_low,
    # filter_high] (with G = 8 this drops all-correct and all-wrong groups).
    filter_enabled: bool = True
    filter_low: float = 0.1
    filter_high: float = 0.9

    # Optimisation passes (mu) over each rollout batch.
    ppo_epochs: int = 1
    # Longest response the sampler produces; the 'dr_grpo' loss divides by it.
    max_response_length: int = 4096

    # ADORA: scale a group's advantages by adora_factor when no correct answer is longer than the
    # mean length of the wrong, non-truncated answers (grpo.adora_scale).
    adora_enabled: bool = False
    adora_factor: float = 0.1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | ml_collections.ConfigDict) -> RLConfig:
        """Builds and validates a config from a dict or ConfigDict; missing keys take defaults."""
        if isinstance(values, ml_collections.ConfigDict):
            values = values.to_dict()
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(
                f"rl.{unknown[0]} is not an RL option; known options: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, suitable for `ml_collections.ConfigDict`."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raises InputError naming the first field whose value the GRPO maths cannot use."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), hints[field.name])

        def require(ok: bool, field: str, condition: str, why: str) -> None:
            if not ok:
                value = getattr(self, field)
                raise InputError(f"rl.{field} must be {condition} (got {value!r}): {why}")

        require(self.num_generations > 1, "num_generations", "> 1",
                "GRPO normalises rewards within a group")
        require(self.scale_rewards == "none" or self.advantage == "grpo", "scale_rewards",
                f"'none' with rl.advantage={self.advantage!r}",
                "only 'grpo' advantages are divided by a std ('dr_grpo' is unscaled by "
                "definition; 'rloo' is whitened over the training batch instead: "
                "rl.whiten_advantages=True)")
        require(self.scale_rewards != "batch" or not self.whiten_advantages, "scale_rewards",
                "'group' or 'none' with rl.whiten_advantages=True",
                "whitening the training batch already divides it by a batch std")
        require(self.adv_eps >= 0, "adv_eps", ">= 0", "it is added to the group std")
        require(0 <= self.clip_eps_low < 1, "clip_eps_low", "in [0, 1)",
                "the lower clip bound 1 - eps must stay positive")
        require(self.clip_eps_high >= 0, "clip_eps_high", ">= 0", "it widens the clip range")
        require(self.ratio_cap is None or self.loss == "cpgd"
                or self.ratio_cap > 1 + self.clip_eps_high, "ratio_cap",
                f"> 1 + rl.clip_eps_high = {1 + self.clip_eps_high:g}, or None",
                "a cap at or below the upper clip bound cuts ratios the clip keeps, which "
                "changes the clipped objective")
        require(self.cpgd_drift_coef >= 0, "cpgd_drift_coef", ">= 0", "it weights a penalty")
        require(self.kl_coef >= 0, "kl_coef", ">= 0", "it weights a penalty")
        require(self.entropy_coef >= 0, "entropy_coef", ">= 0", "it weights a bonus")
        require(0 <= self.filter_low <= 1, "filter_low", "in [0, 1]", "it bounds a mean accuracy")
        require(self.filter_low <= self.filter_high <= 1, "filter_high",
                f"in [rl.filter_low={self.filter_low}, 1]", "otherwise every prompt is dropped")
        require(self.ppo_epochs >= 1, "ppo_epochs", ">= 1", "each rollout is trained on")
        require(self.max_response_length >= 1, "max_response_length", ">= 1",
                "responses need at least one token")
        require(0 <= self.adora_factor <= 1, "adora_factor", "in [0, 1]",
                "ADORA down-weights groups")


def _check_type(name: str, value: Any, hint: Any) -> None:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise InputError(f"rl.{name} must be one of {choices} (got {value!r})")
        return
    is_union = typing.get_origin(hint) in (Union, types.UnionType)
    allowed = typing.get_args(hint) if is_union else (hint,)
    if not any(_is_instance(value, kind) for kind in allowed):
        names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
        raise InputError(f"rl.{name} must be {names} (got {type(value).__name__} {value!r})")


def _is_instance(value: Any, kind: type) -> bool:
    # bool is an int subclass, but True is never a sensible group size or coefficient.
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
