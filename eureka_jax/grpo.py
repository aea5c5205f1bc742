"""GRPO maths: group advantages, online filter, ADORA, policy losses, KL and entropy.

Pure functions with explicit masks; log-probs are float32 whatever the model dtype. Everything is
jittable with the RLConfig static (it is frozen, so hashable).

Shapes: P prompts, G samples per prompt, N = P*G rewards laid out prompt-major (sample g of prompt
p at index p*G + g), B sequences in an update batch, T response tokens, V vocabulary.
`mask_BxT` is True on response tokens that count; sequences with no True token (batch padding)
count nowhere: not in any mean, not in dr_grpo's number of sequences B'.

Advantages (one scalar per sequence, which every token of the response gets), computed per
rollout by rollout.rollout_advantages in this order: rewards -> KL penalty (placement 'reward')
-> group advantages -> ADORA -> online filter; whitening runs later, over a step's training batch.
  grpo     A = (r - mean_G r) / (std_G r + eps)        scale 'group'; std unbiased (ddof=1), as
                                                        torch.std (MM-Eureka)
           A = (r - mean_G r) / (std_N r + eps)        scale 'batch': the unbiased std of all N
                                                        rewards of the rollout (TRL, LitePPO)
           A = r - mean_G r                             scale 'none'
  rloo     A = r - (sum_G r - r) / (G - 1)              MM-Eureka v1
  dr_grpo  A = r - mean_G r
  whiten   A = (A - m) / sqrt(max(v, eps))              m, v weighted by response length (OpenRLHF)
A zero std (all-equal rewards) gives advantages of exactly 0, whatever eps.

Policy losses. l = logp - old_logp per token, cap(x) = min(x, ratio_cap),
clip(x) = clip(x, 1 - eps_low, 1 + eps_high), surrogate(x) = -min(x A, clip(x) A):
  grpo     surrogate(cap(exp(l)))        per token; mean over each sequence, then over sequences
  dapo     surrogate(cap(exp(l)))        per token; sum over all tokens / number of tokens
  dr_grpo  surrogate(cap(exp(l)))        per token; sum over all tokens / (B' * max_response_length)
  gspo     surrogate(cap(exp(mean_t l))) per sequence; mean over sequences
  cpgd     A > 0:  -min(logp, old + log(1 + eps_high)) A
           A <= 0: -max(logp, old + log(1 - eps_low)) A
           plus drift_coef * min(exp(stop_grad(l)) - 1, 2) * logp; token mean as dapo
The cap and the clip both pass no gradient where they are active.

KL to the reference, d = ref_logp - logp per token: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1.
  total loss = pg + kl_coef * KL - entropy_coef * H
where KL (placement 'loss') and the entropy H are aggregated like the policy term, so that each
is a loss term of the same kind as pg (under dr_grpo: scaled by mean length / max length). With
placement 'reward' the loss has no KL term: penalty_B = kl_coef * sum_t KL_t of the sampled
tokens is subtracted from the rewards before the advantages (kl_reward_penalty). The logged
`entropy` metric is the token mean of H whatever the loss, so runs with different losses compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eureka_jax.rl_config import RLConfig

# Group means are compared with this slack because float32 means land an ulp off the bounds: the
# mean of eight 0.9 scores is 0.90000004, yet it is on the bound 0.9, which is kept.
_FILTER_SLACK = 1e-6
# CPGD bounds the drift weight exp(l) - 1 from above.
_CPGD_DRIFT_MAX = 2.0


# ----------------------------------------------------------------------------- advantages


def group_advantages(
    rewards_N: jax.Array, group_size: int, kind: str, scale: str, eps: float
) -> jax.Array:
    """Per-sequence advantages from rewards laid out prompt-major; returns float32 advantages_N.

    `scale` ('group', 'batch' or 'none') is what 'grpo' advantages are divided by; the other
    kinds need 'none'. A group whose rewards are all equal gets advantages of exactly 0, whatever
    G, the rewards and eps.
    """
    if group_size < 2 or rewards_N.shape[0] % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the {rewards_N.shape[0]} rewards"
            f" (got {group_size})"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown reward scaling {scale!r}")
    if scale != "none" and kind != "grpo":
        raise ValueError(f"scale={scale!r} applies to the 'grpo' advantage only (got {kind!r})")
    rewards_N = rewards_N.astype(jnp.float32)
    # Every formula is shift-invariant, so measure rewards from the group's first one. Then an
    # all-equal group is exactly 0: float32 means such as mean([0.1] * 3) are off by an ulp, and
    # that ulp divided by a std of ~1e-8 would become an advantage of about -0.7.
    rewards_PxG = rewards_N.reshape(-1, group_size)
    rewards_PxG = rewards_PxG - rewards_PxG[:, :1]
    if kind in ("grpo", "dr_grpo"):
        advantages_PxG = rewards_PxG - rewards_PxG.mean(axis=-1, keepdims=True)
        if scale == "group":
            advantages_PxG = _divide_by_std(
                advantages_PxG, rewards_PxG.std(axis=-1, ddof=1, keepdims=True), eps)
        elif scale == "batch":
            # Shifted by one global value only, so that the batch std is the rewards' own.
            batch_std = (rewards_N - rewards_N[0]).std(ddof=1)
            advantages_PxG = _divide_by_std(advantages_PxG, batch_std, eps)
    elif kind == "rloo":
        others_mean_PxG = (rewards_PxG.sum(axis=-1, keepdims=True) - rewards_PxG) / (
            group_size - 1
        )
        advantages_PxG = rewards_PxG - others_mean_PxG
    else:
        raise ValueError(f"unknown advantage kind {kind!r}")
    return advantages_PxG.reshape(-1)


def _divide_by_std(advantages: jax.Array, std: jax.Array, eps: float) -> jax.Array:
    # A zero std only comes with all-zero advantages; keep them 0 rather than 0/0 when eps = 0.
    return jnp.where(std > 0, advantages / jnp.where(std > 0, std + eps, 1.0), 0.0)


def whiten_advantages(
    advantages_N: jax.Array, weights_N: jax.Array, eps: float = 1e-8
) -> jax.Array:
    """Batch whitening (A - m) / sqrt(max(v, eps)) with weighted mean m and variance v.

    Pass response lengths as weights to reproduce OpenRLHF/MM-Eureka v1, which whiten per token;
    pass ones for per-sequence whitening. The weights must have a positive sum.
    """
    advantages_N = advantages_N.astype(jnp.float32)
    weights_N = weights_N.astype(jnp.float32)
    total_weight = weights_N.sum()
    mean = (weights_N * advantages_N).sum() / total_weight
    variance = (weights_N * (advantages_N - mean) ** 2).sum() / total_weight
    return (advantages_N - mean) * jax.lax.rsqrt(jnp.maximum(variance, eps))


def online_filter(accuracy_N: jax.Array, group_size: int, low: float, high: float) -> jax.Array:
    """Boolean keep_P: True for prompts whose group mean accuracy lies in [low, high] inclusive."""
    mean_accuracy_P = accuracy_N.astype(jnp.float32).reshape(-1, group_size).mean(axis=-1)
    return (mean_accuracy_P >= low - _FILTER_SLACK) & (mean_accuracy_P <= high + _FILTER_SLACK)


def adora_scale(
    advantages_N: jax.Array,
    correct_N: jax.Array,
    lengths_N: jax.Array,
    truncated_N: jax.Array,
    group_size: int,
    factor: float = 0.1,
) -> jax.Array:
    """ADORA: multiplies a group's advantages by `factor` unless a correct answer is longer
    (strictly) than the mean length of the group's wrong, non-truncated answers.

    Edge cases, as MM-Eureka's weight_func decides them:
    - no correct answer: the group keeps its advantages (there is no length to compare);
    - correct answers but no wrong, non-truncated one (all correct, or every wrong answer hit the
      length limit): the mean is taken as +inf, so the group is scaled;
    - a longest correct answer exactly as long as the mean: scaled ("longer" is strict).
    """
    correct_PxG = correct_N.astype(bool).reshape(-1, group_size)
    lengths_PxG = lengths_N.astype(jnp.float32).reshape(-1, group_size)
    wrong_PxG = ~correct_PxG & ~truncated_N.astype(bool).reshape(-1, group_size)
    longest_correct_P = jnp.max(jnp.where(correct_PxG, lengths_PxG, -jnp.inf), axis=-1)
    num_wrong_P = wrong_PxG.sum(axis=-1)
    mean_wrong_P = jnp.where(
        num_wrong_P > 0,
        jnp.where(wrong_PxG, lengths_PxG, 0.0).sum(axis=-1) / jnp.maximum(num_wrong_P, 1),
        jnp.inf,
    )
    keep_P = ~correct_PxG.any(axis=-1) | (longest_correct_P > mean_wrong_P)
    scale_Px1 = jnp.where(keep_P, 1.0, factor)[:, None]
    return (advantages_N.astype(jnp.float32).reshape(-1, group_size) * scale_Px1).reshape(-1)


# ----------------------------------------------------------------------------- KL


def kl_per_token(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, estimator: str) -> jax.Array:
    """Per-token KL estimate on d = ref_logp - logp (Schulman's k1 / k2 / k3)."""
    d_BxT = ref_logp_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32)
    if estimator == "k1":
        return -d_BxT
    if estimator == "k2":
        return 0.5 * d_BxT**2
    if estimator == "k3":
        return jnp.exp(d_BxT) - d_BxT - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def kl_reward_penalty(
    logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array,
    mask_BxT: jax.Array,
    kl_coef: float,
    estimator: str,
) -> jax.Array:
    """KL in the reward (placement 'reward'): penalty_B = kl_coef * sum over valid tokens of KL.

    `logp_BxT` are the sampling policy's log-probs, so the penalty is a constant of the update.
    Subtract it from the sequence rewards before `group_advantages`. OpenRLHF instead adds
    -kl_coef * KL_t to each token's reward and uses returns-to-go; with gamma = 1 its return at
    the first token equals this per-sequence value. Advantages here are one per sequence, so the
    whole-sequence sum is what every token gets.
    """
    mask_BxT = mask_BxT.astype(bool)
    kl_BxT = kl_per_token(_zero_padding(logp_BxT, mask_BxT), _zero_padding(ref_logp_BxT, mask_BxT),
                          estimator)
    return kl_coef * jnp.where(mask_BxT, kl_BxT, 0.0).sum(axis=-1)


# ----------------------------------------------------------------------------- aggregation


def _sequence_mean(values_BxT: jax.Array, mask_BxT: jax.Array, cfg: RLConfig) -> jax.Array:
    """Mean over each sequence's valid tokens, then over sequences that have any."""
    tokens_B = mask_BxT.sum(axis=-1)
    per_sequence_B = jnp.where(mask_BxT, values_BxT, 0.0).sum(axis=-1) / jnp.maximum(tokens_B, 1)
    return per_sequence_B.sum() / jnp.maximum((tokens_B > 0).sum(), 1)


def _token_mean(values_BxT: jax.Array, mask_BxT: jax.Array, cfg: RLConfig) -> jax.Array:
    """Sum over all valid tokens / number of valid tokens."""
    return jnp.where(mask_BxT, values_BxT, 0.0).sum() / jnp.maximum(mask_BxT.sum(), 1)


def _max_length_mean(values_BxT: jax.Array, mask_BxT: jax.Array, cfg: RLConfig) -> jax.Array:
    """Dr. GRPO: sum over all valid tokens / (sequences * max_response_length), no length bias."""
    num_sequences = jnp.maximum(mask_BxT.any(axis=-1).sum(), 1)
    total = jnp.where(mask_BxT, values_BxT, 0.0).sum()
    return total / (num_sequences * cfg.max_response_length)


# ----------------------------------------------------------------------------- policy terms


class _PolicyTerms(NamedTuple):
    loss_BxT: jax.Array  # policy loss per token, before aggregation
    clipped_BxT: jax.Array  # True where the clip (or cpgd's clamp) removed the gradient
    ratio_BxT: jax.Array  # importance ratio the loss used, before the cap


def _clipped_surrogate(
    ratio: jax.Array, advantages: jax.Array, cfg: RLConfig
) -> tuple[jax.Array, jax.Array]:
    """PPO surrogate -min(r A, clip(r) A) on the capped ratio, and where the clip is active."""
    if cfg.ratio_cap is not None:
        ratio = jnp.minimum(ratio, cfg.ratio_cap)
    lower, upper = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    loss = -jnp.minimum(ratio * advantages, jnp.clip(ratio, lower, upper) * advantages)
    clipped = ((advantages > 0) & (ratio > upper)) | ((advantages < 0) & (ratio < lower))
    return loss, clipped


def _token_ratio_terms(
    logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array,
    mask_BxT: jax.Array, cfg: RLConfig,
) -> _PolicyTerms:
    ratio_BxT = jnp.exp(logp_BxT - old_logp_BxT)
    loss_BxT, clipped_BxT = _clipped_surrogate(ratio_BxT, advantages_B[:, None], cfg)
    return _PolicyTerms(loss_BxT, clipped_BxT, ratio_BxT)


def _sequence_ratio_terms(
    logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array,
    mask_BxT: jax.Array, cfg: RLConfig,
) -> _PolicyTerms:
    """GSPO: one ratio per sequence; its loss is spread over the tokens so that the per-sequence
    token mean gives it back exactly."""
    log_ratio_sum_B = jnp.where(mask_BxT, logp_BxT - old_logp_BxT, 0.0).sum(axis=-1)
    mean_log_ratio_B = log_ratio_sum_B / jnp.maximum(mask_BxT.sum(axis=-1), 1)
    ratio_B = jnp.exp(mean_log_ratio_B)
    loss_B, clipped_B = _clipped_surrogate(ratio_B, advantages_B, cfg)
    shape = mask_BxT.shape
    return _PolicyTerms(
        jnp.broadcast_to(loss_B[:, None], shape),
        jnp.broadcast_to(clipped_B[:, None], shape),
        jnp.broadcast_to(ratio_B[:, None], shape),
    )


def _clamped_logp_terms(
    logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array,
    mask_BxT: jax.Array, cfg: RLConfig,
) -> _PolicyTerms:
    """CPGD: clamp the log-prob rather than the ratio, plus a policy-drift penalty."""
    advantages_Bx1 = advantages_B[:, None]
    upper_BxT = old_logp_BxT + jnp.log1p(cfg.clip_eps_high)
    lower_BxT = old_logp_BxT + jnp.log1p(-cfg.clip_eps_low)
    positive_Bx1 = advantages_Bx1 > 0
    clamped_logp_BxT = jnp.where(
        positive_Bx1, jnp.minimum(logp_BxT, upper_BxT), jnp.maximum(logp_BxT, lower_BxT)
    )
    ratio_BxT = jnp.exp(logp_BxT - old_logp_BxT)
    drift_weight_BxT = jnp.minimum(jax.lax.stop_gradient(ratio_BxT) - 1.0, _CPGD_DRIFT_MAX)
    drift_BxT = cfg.cpgd_drift_coef * drift_weight_BxT * logp_BxT
    loss_BxT = -clamped_logp_BxT * advantages_Bx1 + drift_BxT
    clipped_BxT = (positive_Bx1 & (logp_BxT > upper_BxT)) | (
        (advantages_Bx1 < 0) & (logp_BxT < lower_BxT)
    )
    return _PolicyTerms(loss_BxT, clipped_BxT, ratio_BxT)


_Terms = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, RLConfig], _PolicyTerms]
_Aggregate = Callable[[jax.Array, jax.Array, RLConfig], jax.Array]

# The registry of policy losses: per-token terms and how they are reduced to a scalar.
POLICY_LOSSES: dict[str, tuple[_Terms, _Aggregate]] = {
    "grpo": (_token_ratio_terms, _sequence_mean),
    "dapo": (_token_ratio_terms, _token_mean),
    "dr_grpo": (_token_ratio_terms, _max_length_mean),
    "gspo": (_sequence_ratio_terms, _sequence_mean),
    "cpgd": (_clamped_logp_terms, _token_mean),
}


# ----------------------------------------------------------------------------- the loss


def policy_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    cfg: RLConfig,
    ref_logp_BxT: jax.Array | None = None,
    entropy_BxT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss to minimise and float32 scalar metrics.

    Metrics: loss, pg_loss (policy term, including cpgd's drift), clip_fraction (fraction of
    valid tokens whose gradient the clip/clamp removed), ratio_mean (token mean of the
    uncapped ratio; gspo's sequence ratio counts once per token), approx_kl (token mean of
    k3 KL(old || new) = exp(l) - 1 - l), and when given: kl (ref_logp_BxT, aggregated like the
    policy term, as the loss adds it; placement 'reward' only reports it) and entropy (the
    token mean of entropy_BxT; the bonus in the loss is aggregated like the policy term).
    """
    if cfg.kl_coef > 0 and cfg.kl_placement == "loss" and ref_logp_BxT is None:
        raise ValueError("kl_coef > 0 with kl_placement='loss' needs ref_logp_BxT")
    if cfg.entropy_coef > 0 and entropy_BxT is None:
        raise ValueError("entropy_coef > 0 needs entropy_BxT")
    if cfg.loss == "dr_grpo" and logp_BxT.shape[-1] > cfg.max_response_length:
        raise ValueError(
            f"dr_grpo divides by max_response_length={cfg.max_response_length} but the responses"
            f" have {logp_BxT.shape[-1]} tokens"
        )
    terms_fn, aggregate = POLICY_LOSSES[cfg.loss]
    mask_BxT = mask_BxT.astype(bool)
    logp_BxT = _zero_padding(logp_BxT, mask_BxT)
    old_logp_BxT = _zero_padding(old_logp_BxT, mask_BxT)
    advantages_B = advantages_B.astype(jnp.float32)

    terms = terms_fn(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, cfg)
    pg_loss = aggregate(terms.loss_BxT, mask_BxT, cfg)
    log_ratio_BxT = jax.lax.stop_gradient(logp_BxT - old_logp_BxT)
    metrics = {
        "pg_loss": pg_loss,
        "clip_fraction": _token_mean(terms.clipped_BxT.astype(jnp.float32), mask_BxT, cfg),
        "ratio_mean": _token_mean(jax.lax.stop_gradient(terms.ratio_BxT), mask_BxT, cfg),
        "approx_kl": _token_mean(jnp.expm1(log_ratio_BxT) - log_ratio_BxT, mask_BxT, cfg),
    }
    loss = pg_loss
    if ref_logp_BxT is not None:
        kl_BxT = kl_per_token(logp_BxT, _zero_padding(ref_logp_BxT, mask_BxT), cfg.kl_estimator)
        metrics["kl"] = aggregate(kl_BxT, mask_BxT, cfg)
        if cfg.kl_placement == "loss" and cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * metrics["kl"]
    if entropy_BxT is not None:
        entropy_BxT = _zero_padding(entropy_BxT, mask_BxT)
        metrics["entropy"] = _token_mean(entropy_BxT, mask_BxT, cfg)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * aggregate(entropy_BxT, mask_BxT, cfg)
    metrics["loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------- from logits


def _zero_padding(logp_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    # Padding may hold anything (-inf, garbage); exp() of it would put inf/nan into sums and
    # gradients even when masked, so padded log-probs become 0 before any arithmetic.
    return jnp.where(mask_BxT, logp_BxT.astype(jnp.float32), 0.0)
