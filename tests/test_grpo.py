"""GRPO maths against independent NumPy references (loops over groups / sequences / tokens).

Losses are checked for values, metrics and gradients; gradients against central finite
differences of the NumPy loss in float64. Every JAX call runs jitted and eagerly.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eureka_jax import grpo, policy
from eureka_jax.errors import InputError
from eureka_jax.rl_config import LOSS_KINDS, RLConfig
from eureka_jax.rollout import ScoredGroup, rollout_advantages, whiten_training_batch


@pytest.fixture(params=[True, False], ids=["jit", "eager"])
def maybe_jit(request):
    return jax.jit if request.param else (lambda fn: fn)


def finite_difference_grad(loss_fn, x, step=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (loss_fn(up) - loss_fn(down)) / (2 * step)
    return grad


# ----------------------------------------------------------------------------- advantages

# Three prompts x four samples; the middle group is all equal (std 0).
REWARDS = np.array([1.5, 0.5, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 0.0, 0.5], np.float32)


def np_unbiased_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def np_group_advantages(rewards, group_size, kind, scale, eps):
    rewards = [float(r) for r in rewards]
    batch_std = np_unbiased_std(rewards)  # TRL's rewards.std() over the whole batch
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / group_size
        std = {"group": np_unbiased_std(group), "batch": batch_std, "none": None}[scale]
        for r in group:
            if kind == "rloo":
                out.append(r - (sum(group) - r) / (group_size - 1))
            elif std is None:
                out.append(r - mean)
            else:
                out.append((r - mean) / (std + eps) if std > 0 else 0.0)
    return np.array(out)


@pytest.mark.parametrize(
    "kind, scale",
    [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "none"),
     ("dr_grpo", "none")],
)
@pytest.mark.parametrize("eps", [1e-9, 1e-4, 0.0])
def test_group_advantages_match_numpy(maybe_jit, kind, scale, eps):
    fn = maybe_jit(lambda r: grpo.group_advantages(r, 4, kind, scale, eps))
    advantages = np.asarray(fn(jnp.asarray(REWARDS)))
    np.testing.assert_allclose(
        advantages, np_group_advantages(REWARDS, 4, kind, scale, eps), rtol=1e-6, atol=1e-6,
    )
    np.testing.assert_array_equal(advantages[4:8], 0.0)  # all-equal group: no signal, no nan
    assert advantages.dtype == np.float32


@pytest.mark.parametrize("kind, scale", [("grpo", "group"), ("grpo", "batch"), ("rloo", "none")])
@pytest.mark.parametrize("group_size", [3, 7, 10])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_all_equal_groups_are_exactly_zero(maybe_jit, kind, scale, group_size, eps):
    # float32 group means of 0.1 or 1.5 are off by an ulp for these sizes; dividing that by a
    # ~0 std must not turn into an advantage, nor 0 / 0 into nan when eps = 0.
    rewards = np.repeat(np.array([0.1, 1.5, 0.7], np.float32), group_size)
    fn = maybe_jit(lambda r: grpo.group_advantages(r, group_size, kind, scale, eps))
    np.testing.assert_array_equal(fn(jnp.asarray(rewards)), 0.0)
    # A whole batch of equal rewards: the batch std is 0 as well.
    same = np.full(2 * group_size, 0.1, np.float32)
    np.testing.assert_array_equal(fn(jnp.asarray(same)), 0.0)


def test_batch_scale_divides_by_one_std_for_all_groups():
    # Same group deviations, different spread across groups: only the batch std differs.
    rewards = np.array([0.0, 1.0, 10.0, 11.0], np.float32)
    group_scaled = grpo.group_advantages(jnp.asarray(rewards), 2, "grpo", "group", 0.0)
    batch_scaled = grpo.group_advantages(jnp.asarray(rewards), 2, "grpo", "batch", 0.0)
    np.testing.assert_allclose(group_scaled, [-0.5 / 0.5**0.5, 0.5 / 0.5**0.5] * 2, rtol=1e-6)
    np.testing.assert_allclose(batch_scaled, np.array([-0.5, 0.5] * 2) / rewards.std(ddof=1),
                               rtol=1e-6)


def test_group_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match="divide"):
        grpo.group_advantages(jnp.ones(10), 4, "grpo", "group", 1e-9)
    with pytest.raises(ValueError, match="'grpo' advantage only"):
        grpo.group_advantages(jnp.ones(8), 4, "rloo", "group", 1e-9)
    with pytest.raises(ValueError, match="'grpo' advantage only"):
        grpo.group_advantages(jnp.ones(8), 4, "dr_grpo", "batch", 1e-9)
    with pytest.raises(ValueError, match="unknown reward scaling"):
        grpo.group_advantages(jnp.ones(8), 4, "grpo", "token", 1e-9)


@pytest.mark.parametrize("weighted", [True, False], ids=["token_weighted", "per_sequence"])
def test_whiten_advantages_match_numpy(maybe_jit, weighted):
    advantages = np.array([0.5, -1.0, 2.0, 0.0, -0.25, 1.0], np.float32)
    weights = np.array([3, 1, 7, 2, 5, 4], np.float32) if weighted else np.ones(6, np.float32)
    tokens = np.repeat(advantages.astype(np.float64), weights.astype(int))  # one entry per token
    expected = (advantages - tokens.mean()) / max(tokens.var(), 1e-8) ** 0.5
    whitened = maybe_jit(grpo.whiten_advantages)(jnp.asarray(advantages), jnp.asarray(weights))
    np.testing.assert_allclose(whitened, expected, rtol=1e-5, atol=1e-6)


def scored_group(advantages, lengths):
    # The whitening reads only advantages and lengths; the rest is placeholder.
    g = len(advantages)
    return ScoredGroup(row=None, record_id="r", tokens_GxL=np.zeros((g, 8), np.int32),
                       logprobs_GxL=np.zeros((g, 8), np.float32),
                       lengths_G=np.asarray(lengths, np.int32), rewards_G=np.zeros(g, np.float32),
                       advantages_G=np.asarray(advantages, np.float32))


def test_whiten_training_batch_matches_numpy_over_all_tokens_of_the_step():
    groups = [scored_group([0.5, -0.5, 1.0], [3, 1, 7]), scored_group([2.0, 0.0, -1.0], [2, 5, 4])]
    whitened = whiten_training_batch(groups, RLConfig(num_generations=3, whiten_advantages=True))
    # OpenRLHF: every token of a response carries its advantage; mean and variance over tokens.
    tokens = [float(a) for grp in groups for a, n in zip(grp.advantages_G, grp.lengths_G,
                                                           strict=True) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    variance = sum((t - mean) ** 2 for t in tokens) / len(tokens)
    for before, after in zip(groups, whitened, strict=True):
        expected = [(a - mean) / max(variance, 1e-8) ** 0.5 for a in before.advantages_G]
        np.testing.assert_allclose(after.advantages_G, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(after.lengths_G, before.lengths_G)
    assert whiten_training_batch(groups, RLConfig(num_generations=3)) == groups
    assert whiten_training_batch([], RLConfig(whiten_advantages=True)) == []


def np_rollout_advantages(rl, rewards, accuracy, lengths, truncated, logp, ref):
    """rewards -> KL penalty -> group advantages -> ADORA -> filter, with loops."""
    rewards = [float(r) for r in rewards]
    penalties = []
    if rl.kl_coef > 0 and rl.kl_placement == "reward":
        penalties = [rl.kl_coef * sum(np_kl(float(logp[n, t]), float(ref[n, t]), rl.kl_estimator)
                                      for t in range(lengths[n]))
                     for n in range(len(rewards))]
        rewards = [r - p for r, p in zip(rewards, penalties, strict=True)]
    advantages = np_group_advantages(rewards, rl.num_generations, rl.advantage,
                                     rl.scale_rewards, rl.adv_eps)
    if rl.adora_enabled:
        advantages = np_adora_scale(advantages, np.asarray(accuracy) > 0.5, lengths, truncated,
                                    rl.num_generations, rl.adora_factor)
    keep = []
    for start in range(0, len(rewards), rl.num_generations):
        mean_accuracy = sum(accuracy[start : start + rl.num_generations]) / rl.num_generations
        keep.append(not rl.filter_enabled or rl.filter_low <= mean_accuracy <= rl.filter_high)
    return advantages, keep, penalties


@pytest.mark.parametrize(
    "cfg",
    [
        RLConfig(num_generations=4, kl_coef=0.1, kl_placement="reward", kl_estimator="k1"),
        RLConfig(num_generations=4, kl_coef=0.05, kl_placement="reward", scale_rewards="batch",
                 adora_enabled=True),
        RLConfig(num_generations=4, kl_coef=0.2, kl_placement="reward", kl_estimator="k2",
                 advantage="rloo", scale_rewards="none", filter_enabled=False),
        RLConfig(num_generations=4, kl_coef=0.1, scale_rewards="batch"),  # KL in the loss
    ],
    ids=["kl_reward_k1", "kl_reward_batch_adora", "kl_reward_rloo", "kl_loss_batch"],
)
def test_rollout_advantages_match_numpy(cfg):
    rng = np.random.default_rng(3)
    accuracy = np.array([1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0], np.float32)
    rewards = accuracy + 0.5 * np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1], np.float32)
    lengths = np.array([5, 2, 3, 6, 1, 4, 6, 2, 3, 3, 6, 5], np.int32)
    truncated = lengths == 6
    logp = rng.uniform(-3, -0.1, (12, 6)).astype(np.float32)
    ref = (logp + rng.uniform(-0.5, 0.5, (12, 6))).astype(np.float32)
    logp[np.arange(6)[None, :] >= lengths[:, None]] = np.nan  # padding must not count

    scored = rollout_advantages(cfg, rewards, accuracy, lengths, truncated, logp, ref)
    advantages, keep, penalties = np_rollout_advantages(cfg, rewards, accuracy, lengths,
                                                        truncated, logp, ref)
    np.testing.assert_allclose(scored.advantages_N, advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scored.keep_P, keep)
    assert scored.metrics["filter/kept_fraction"] == np.mean(keep)
    if penalties:
        np.testing.assert_allclose(scored.metrics["kl/reward_penalty"], np.mean(penalties),
                                   rtol=1e-5)
        assert scored.advantages_N.dtype == np.float32
    else:
        assert "kl/reward_penalty" not in scored.metrics


def test_rollout_advantages_need_log_probs_for_kl_in_reward():
    cfg = RLConfig(num_generations=2, kl_coef=0.1, kl_placement="reward")
    with pytest.raises(ValueError, match="ref_logp_NxL"):
        rollout_advantages(cfg, np.ones(4), np.ones(4), np.ones(4, np.int32), np.zeros(4, bool))


@pytest.mark.parametrize(
    "group_size, accuracy_by_group, expected_keep",
    [
        # n=10 puts group means exactly on the bounds 0.1 and 0.9: both are kept.
        (10, [[0] * 10, [1] + [0] * 9, [1] * 5 + [0] * 5, [1] * 9 + [0], [1] * 10],
         [False, True, True, True, False]),
        # n=8: all-wrong and all-correct dropped, one right / one wrong kept; fractional scores,
        # where the float32 mean of eight 0.9s is 0.90000004 and still counts as 0.9.
        (8, [[0] * 8, [1] + [0] * 7, [1] * 7 + [0], [1] * 8, [0.7] + [0] * 7, [0.95] * 8,
             [0.9] * 8],
         [False, True, True, False, False, False, True]),
    ],
    ids=["n10_bounds", "n8"],
)
def test_online_filter_edges(maybe_jit, group_size, accuracy_by_group, expected_keep):
    accuracy = np.array(accuracy_by_group, np.float32).reshape(-1)
    keep = maybe_jit(lambda a: grpo.online_filter(a, group_size, 0.1, 0.9))(jnp.asarray(accuracy))
    np.testing.assert_array_equal(keep, expected_keep)
    assert keep.dtype == jnp.bool_


def np_adora_scale(advantages, correct, lengths, truncated, group_size, factor):
    out = advantages.astype(np.float64).copy()
    for start in range(0, len(advantages), group_size):
        group = range(start, start + group_size)
        correct_lengths = [lengths[i] for i in group if correct[i]]
        wrong_lengths = [lengths[i] for i in group if not correct[i] and not truncated[i]]
        if not correct_lengths:
            continue
        mean_wrong = sum(wrong_lengths) / len(wrong_lengths) if wrong_lengths else math.inf
        if not max(correct_lengths) > mean_wrong:
            out[start : start + group_size] *= factor
    return out


def test_adora_scale_matches_numpy_and_edge_cases(maybe_jit):
    groups = [  # (correct, lengths, truncated), group size 4
        ([1, 0, 0, 0], [300, 100, 200, 250], [0, 0, 0, 0]),  # a correct answer is longer: keep
        ([1, 1, 0, 0], [100, 120, 200, 300], [0, 0, 0, 0]),  # correct ones are shorter: scale
        ([0, 0, 0, 0], [100, 120, 200, 300], [0, 0, 0, 0]),  # no correct answer: keep
        ([1, 1, 1, 1], [100, 120, 200, 300], [0, 0, 0, 0]),  # all correct: no wrong mean, scale
        ([1, 0, 0, 0], [150, 400, 400, 400], [0, 1, 1, 1]),  # every wrong one truncated: scale
        ([1, 0, 0, 0], [200, 100, 300, 999], [0, 0, 0, 1]),  # equal to the mean: scale (strict)
        ([1, 0, 0, 0], [250, 100, 200, 999], [0, 0, 0, 1]),  # truncated excluded from mean: keep
    ]
    correct = np.array([c for g in groups for c in g[0]], bool)
    lengths = np.array([n for g in groups for n in g[1]], np.int32)
    truncated = np.array([t for g in groups for t in g[2]], bool)
    advantages = np.random.default_rng(0).normal(size=len(correct)).astype(np.float32)

    fn = maybe_jit(lambda a, c, n, t: grpo.adora_scale(a, c, n, t, 4, factor=0.1))
    scaled = np.asarray(fn(advantages, correct, lengths, truncated))
    np.testing.assert_allclose(
        scaled, np_adora_scale(advantages, correct, lengths, truncated, 4, 0.1), rtol=1e-6
    )
    group_scale = (scaled / advantages).reshape(-1, 4)[:, 0]
    np.testing.assert_allclose(group_scale, [1, 0.1, 1, 0.1, 0.1, 0.1, 1], rtol=1e-6)


# ----------------------------------------------------------------------------- policy loss

# Five sequences of up to six tokens: full, short, batch padding (no valid token), one with a
# hole in its mask, and one with zero advantage. The log-ratios l = logp - old are chosen away
# from the kinks ln 0.8, ln 1.2 and ln 3, and include a ratio above the cap with A < 0.
MASK = np.array(
    [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0] * 6, [1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0]],
    bool,
)
LOG_RATIO = np.array(
    [
        [0.05, 0.3, -0.5, 1.5, -0.1, 0.15],
        [1.5, -0.5, 0.1, 0, 0, 0],
        [0] * 6,
        [0.25, -0.05, 0, -0.4, 0.1, 0],
        [0.4, -0.3, 0.02, 0.12, 0, 0],
    ]
)
ADVANTAGES = np.array([0.8, -1.3, 0.5, -0.4, 0.0], np.float32)


def make_batch():
    rng = np.random.default_rng(0)
    logp = rng.uniform(-3.0, -0.1, MASK.shape)
    old = logp - LOG_RATIO
    ref = logp + rng.uniform(-0.5, 0.5, MASK.shape)
    entropy = rng.uniform(0.5, 3.0, MASK.shape)
    # Padding holds values that would poison any unmasked arithmetic.
    logp[~MASK], old[~MASK], ref[~MASK], entropy[~MASK] = np.nan, -np.inf, np.nan, np.nan
    return [x.astype(np.float32) for x in (logp, old, ref, entropy)]


def np_clipped_surrogate(ratio, advantage, cfg):
    if cfg.ratio_cap is not None:
        ratio = min(ratio, cfg.ratio_cap)
    clipped_ratio = min(max(ratio, 1 - cfg.clip_eps_low), 1 + cfg.clip_eps_high)
    clipped = clipped_ratio * advantage < ratio * advantage
    return -min(ratio * advantage, clipped_ratio * advantage), clipped


def np_kl(logp, ref, estimator):
    d = ref - logp
    return {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[estimator]


def np_reduce(per_sequence_values, cfg):
    """per_sequence_values: one list of per-token values for each non-empty sequence."""
    if cfg.loss in ("grpo", "gspo"):
        return sum(sum(v) / len(v) for v in per_sequence_values) / len(per_sequence_values)
    total = sum(sum(v) for v in per_sequence_values)
    if cfg.loss == "dr_grpo":
        return total / (len(per_sequence_values) * cfg.max_response_length)
    return total / sum(len(v) for v in per_sequence_values)


def np_policy_loss(logp, old, ref, entropy, cfg, logp_for_drift):
    """Loss and metrics; `logp_for_drift` plays the role of CPGD's stop-gradient copy."""
    pg, kl, ent, clipped, ratios, approx_kl = [], [], [], [], [], []
    for b in range(MASK.shape[0]):
        tokens = np.nonzero(MASK[b])[0]
        if len(tokens) == 0:
            continue
        a = float(ADVANTAGES[b])
        log_ratios = [logp[b, t] - old[b, t] for t in tokens]
        if cfg.loss == "gspo":
            sequence_ratio = math.exp(sum(log_ratios) / len(tokens))
            loss, was_clipped = np_clipped_surrogate(sequence_ratio, a, cfg)
            terms = [(loss, was_clipped, sequence_ratio)] * len(tokens)
        elif cfg.loss == "cpgd":
            terms = []
            for t, log_ratio in zip(tokens, log_ratios, strict=True):
                upper = old[b, t] + math.log(1 + cfg.clip_eps_high)
                lower = old[b, t] + math.log(1 - cfg.clip_eps_low)
                if a > 0:
                    loss, was_clipped = -min(logp[b, t], upper) * a, logp[b, t] > upper
                else:
                    loss, was_clipped = -max(logp[b, t], lower) * a, a < 0 and logp[b, t] < lower
                drift_weight = min(math.exp(logp_for_drift[b, t] - old[b, t]) - 1, 2.0)
                loss += cfg.cpgd_drift_coef * drift_weight * logp[b, t]
                terms.append((loss, was_clipped, math.exp(log_ratio)))
        else:
            terms = [np_clipped_surrogate(math.exp(lr), a, cfg) + (math.exp(lr),)
                     for lr in log_ratios]
        pg.append([term[0] for term in terms])
        clipped += [float(term[1]) for term in terms]
        ratios += [term[2] for term in terms]
        approx_kl += [math.exp(lr) - 1 - lr for lr in log_ratios]
        kl.append([np_kl(logp[b, t], ref[b, t], cfg.kl_estimator) for t in tokens])
        ent.append([entropy[b, t] for t in tokens])
    metrics = {
        "pg_loss": np_reduce(pg, cfg),
        "kl": np_reduce(kl, cfg),
        # The metric is the plain token mean; the bonus in the loss is reduced like the policy term.
        "entropy": np.mean([e for sequence in ent for e in sequence]),
        "clip_fraction": np.mean(clipped),
        "ratio_mean": np.mean(ratios),
        "approx_kl": np.mean(approx_kl),
    }
    metrics["loss"] = metrics["pg_loss"] - cfg.entropy_coef * np_reduce(ent, cfg)
    if cfg.kl_placement == "loss":
        metrics["loss"] += cfg.kl_coef * metrics["kl"]
    return metrics


POLICY_CONFIGS = {
    "grpo": RLConfig(),
    "grpo_no_cap": RLConfig(ratio_cap=None),
    "dapo": RLConfig(loss="dapo", clip_eps_high=0.28),
    "dr_grpo": RLConfig(
        loss="dr_grpo", advantage="dr_grpo", scale_rewards="none", max_response_length=8
    ),
    "gspo": RLConfig(loss="gspo"),
    "gspo_paper_eps": RLConfig(loss="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    "cpgd": RLConfig(loss="cpgd"),
    "cpgd_asymmetric_eps": RLConfig(loss="cpgd", clip_eps_low=0.35, clip_eps_high=0.28),
    "grpo_k1_entropy": RLConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01),
    "grpo_k2": RLConfig(kl_coef=0.1, kl_estimator="k2"),
    "dapo_k3_entropy": RLConfig(loss="dapo", kl_coef=0.05, kl_estimator="k3", entropy_coef=0.02),
    "gspo_k3": RLConfig(loss="gspo", kl_coef=0.05),
    "cpgd_k3": RLConfig(loss="cpgd", kl_coef=0.05),
    "dr_grpo_k2": RLConfig(
        loss="dr_grpo", advantage="dr_grpo", scale_rewards="none", max_response_length=8,
        kl_coef=0.1, kl_estimator="k2",
    ),
    "dr_grpo_entropy": RLConfig(
        loss="dr_grpo", advantage="dr_grpo", scale_rewards="none", max_response_length=8,
        entropy_coef=0.05,
    ),
    "kl_in_reward": RLConfig(kl_coef=0.1, kl_placement="reward"),
}


@pytest.mark.parametrize("name", list(POLICY_CONFIGS))
def test_policy_loss_values_metrics_and_gradients(maybe_jit, name):
    cfg = POLICY_CONFIGS[name]
    cfg.validate()
    logp, old, ref, entropy = make_batch()

    def loss_fn(logp_BxT):
        return grpo.policy_loss(
            logp_BxT, jnp.asarray(old), jnp.asarray(ADVANTAGES), jnp.asarray(MASK), cfg,
            ref_logp_BxT=jnp.asarray(ref), entropy_BxT=jnp.asarray(entropy),
        )

    (loss, metrics), grad = maybe_jit(jax.value_and_grad(loss_fn, has_aux=True))(logp)

    logp64, old64, ref64, entropy64 = (x.astype(np.float64) for x in (logp, old, ref, entropy))
    expected = np_policy_loss(logp64, old64, ref64, entropy64, cfg, logp_for_drift=logp64)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=2e-5, atol=2e-6, err_msg=key)
    np.testing.assert_allclose(loss, expected["loss"], rtol=2e-5, atol=2e-6)

    expected_grad = finite_difference_grad(
        lambda x: np_policy_loss(x, old64, ref64, entropy64, cfg, logp_for_drift=logp64)["loss"],
        logp64,
    )
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~MASK], 0.0)


def test_entropy_metric_is_the_token_mean_under_every_loss():
    _, old, _, entropy = make_batch()
    logp, _, _, _ = make_batch()
    valid = [float(entropy[b, t]) for b, t in zip(*np.nonzero(MASK), strict=True)]
    for loss in LOSS_KINDS:
        cfg = RLConfig(loss=loss, max_response_length=8, entropy_coef=0.1)
        _, metrics = grpo.policy_loss(logp, old, ADVANTAGES, MASK, cfg, entropy_BxT=entropy)
        np.testing.assert_allclose(metrics["entropy"], sum(valid) / len(valid), rtol=1e-6,
                                   err_msg=loss)


def test_ratio_cap_removes_gradient_of_negative_advantage_tokens():
    # Token (1, 0) has ratio e^1.5 > 3 and A < 0: the cap, not the clip, decides its gradient.
    logp, old, _, _ = make_batch()

    def grad_of(cfg):
        return jax.grad(lambda lp: grpo.policy_loss(lp, old, ADVANTAGES, MASK, cfg)[0])(logp)

    assert grad_of(RLConfig())[1, 0] == 0.0
    assert grad_of(RLConfig(ratio_cap=None))[1, 0] > 0.0  # -A * ratio / (3 tokens * 4 seqs)


def test_policy_loss_metrics_without_optional_inputs():
    logp, old, _, _ = make_batch()
    _, metrics = grpo.policy_loss(logp, old, ADVANTAGES, MASK, RLConfig())
    assert set(metrics) == {"loss", "pg_loss", "clip_fraction", "ratio_mean", "approx_kl"}


def test_policy_loss_rejects_missing_inputs():
    logp, old, _, _ = make_batch()
    with pytest.raises(ValueError, match="ref_logp_BxT"):
        grpo.policy_loss(logp, old, ADVANTAGES, MASK, RLConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy_BxT"):
        grpo.policy_loss(logp, old, ADVANTAGES, MASK, RLConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="max_response_length"):
        grpo.policy_loss(logp, old, ADVANTAGES, MASK, RLConfig(loss="dr_grpo",
                         max_response_length=4, scale_rewards="none", advantage="dr_grpo"))


def test_every_configurable_loss_is_registered():
    assert set(grpo.POLICY_LOSSES) == set(LOSS_KINDS)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_reward_penalty_matches_numpy(maybe_jit, estimator):
    logp, _, ref, _ = make_batch()
    penalty = maybe_jit(lambda lp, rf: grpo.kl_reward_penalty(lp, rf, MASK, 0.1, estimator))(
        logp, ref
    )
    expected = [
        0.1 * sum(np_kl(float(logp[b, t]), float(ref[b, t]), estimator)
                  for t in np.nonzero(MASK[b])[0])
        for b in range(MASK.shape[0])
    ]
    np.testing.assert_allclose(penalty, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- from logits


def test_token_logprobs_and_entropy_from_bfloat16_logits(maybe_jit):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 4, (2, 3, 11)), jnp.bfloat16)
    targets = rng.integers(0, 11, (2, 3))
    logits64 = np.asarray(logits.astype(jnp.float32), np.float64)
    log_softmax = logits64 - np.log(np.exp(logits64).sum(-1, keepdims=True))

    logp = maybe_jit(policy.token_logprobs)(logits, jnp.asarray(targets))
    entropy = maybe_jit(policy.token_entropy)(logits)

    assert logp.dtype == jnp.float32 and entropy.dtype == jnp.float32
    np.testing.assert_allclose(
        logp, np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0], rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        entropy, -(np.exp(log_softmax) * log_softmax).sum(-1), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- config


def test_default_config_is_the_mm_eureka_recipe_and_a_static_jit_argument():
    cfg = RLConfig()
    cfg.validate()
    assert (cfg.num_generations, cfg.advantage, cfg.loss, cfg.ratio_cap) == (8, "grpo", "grpo", 3.0)
    assert hash(cfg) == hash(RLConfig())
    logp, old, _, _ = make_batch()
    jitted = jax.jit(grpo.policy_loss, static_argnames="cfg")
    np.testing.assert_allclose(
        jitted(logp, old, ADVANTAGES, MASK, cfg=cfg)[0],
        grpo.policy_loss(logp, old, ADVANTAGES, MASK, cfg)[0],
        rtol=1e-6,
    )


def test_config_round_trips_through_config_dict():
    cfg = RLConfig(loss="dapo", clip_eps_high=0.28, ratio_cap=None, kl_coef=1e-3)
    config = ml_collections.ConfigDict({"rl": cfg.to_dict()})
    config.rl.num_generations = 16
    rebuilt = RLConfig.from_dict(config.rl)
    assert rebuilt == RLConfig(
        loss="dapo", clip_eps_high=0.28, ratio_cap=None, kl_coef=1e-3, num_generations=16
    )
    assert RLConfig.from_dict({}) == RLConfig()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_generations": 1}, "rl.num_generations must be > 1 (got 1): GRPO normalises "
                                 "rewards within a group"),
        ({"num_generations": 8.0}, "rl.num_generations must be int"),
        ({"loss": "ppo"}, "rl.loss must be one of"),
        ({"kl_estimator": "k4"}, "rl.kl_estimator must be one of"),
        ({"advantage": "rloo"}, "rl.scale_rewards must be 'none' with rl.advantage='rloo'"),
        ({"advantage": "dr_grpo", "scale_rewards": "batch"},
         "rl.scale_rewards must be 'none' with rl.advantage='dr_grpo' (got 'batch')"),
        ({"scale_rewards": "token"}, "rl.scale_rewards must be one of"),
        ({"scale_rewards": "batch", "whiten_advantages": True},
         "rl.scale_rewards must be 'group' or 'none' with rl.whiten_advantages=True"),
        ({"clip_eps_low": 1.0}, "rl.clip_eps_low must be in [0, 1)"),
        ({"ratio_cap": 1.0}, "rl.ratio_cap must be > 1 + rl.clip_eps_high = 1.2, or None"),
        ({"ratio_cap": 1.28, "clip_eps_high": 0.28},
         "rl.ratio_cap must be > 1 + rl.clip_eps_high = 1.28, or None (got 1.28)"),
        ({"kl_coef": -0.1}, "rl.kl_coef must be >= 0"),
        ({"filter_low": 0.5, "filter_high": 0.4}, "rl.filter_high must be in [rl.filter_low=0.5"),
        ({"filter_enabled": 1}, "rl.filter_enabled must be bool"),
        ({"ppo_epochs": 0}, "rl.ppo_epochs must be >= 1"),
        ({"adora_factor": 2.0}, "rl.adora_factor must be in [0, 1]"),
        ({"kl_coeff": 0.1}, "rl.kl_coeff is not an RL option"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(InputError) as error:
        RLConfig.from_dict(overrides)
    assert message in str(error.value)
