"""Every RL option does what it says (issue 10).

Each field of RLConfig has at least one case: from a base config in which the field is relevant,
changing it must change the loss or its gradient on a fixed rollout, or what the loop keeps or
runs (kept groups, number of updates); a value the maths cannot use must be rejected at start-up
with an InputError naming the field. The fixed rollout goes through the real host and loss code:
rewards, accuracies and lengths -> rollout.rollout_advantages -> kept groups ->
rollout.whiten_training_batch -> train.step_minibatches (number of updates) and
grpo.policy_loss (reference log-probs and entropies supplied) -> jax.grad.

A field added to RLConfig without a case here fails test_every_field_has_a_case.
"""

import dataclasses
import typing
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest

from eureka_jax import grpo
from eureka_jax.errors import InputError
from eureka_jax.rl_config import RLConfig
from eureka_jax.rollout import ScoredGroup, rollout_advantages, whiten_training_batch
from eureka_jax.train import LoopConfig, step_minibatches


@pytest.fixture(params=[True, False], ids=["jit", "eager"])
def maybe_jit(request):
    return jax.jit if request.param else (lambda fn: fn)


# ----------------------------------------------------------------------------- the fixed rollout

# Four prompts x four samples, six response tokens. Group mean accuracies 0.25, 0.75, 0 and 0.5,
# so that each filter bound has a group to drop; in group 1 the correct answers are shorter than
# the wrong one, so ADORA scales it; rewards add a 0.5 format score, so no group is all equal.
G, T = 4, 6
ACCURACY_N = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0], np.float32)
FORMAT_N = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1], np.float32)
REWARDS_N = ACCURACY_N + 0.5 * FORMAT_N
LENGTHS_N = np.array([4, 2, 3, 5, 2, 3, 2, 5, 6, 3, 2, 4, 3, 6, 2, 4], np.int32)
TRUNCATED_N = LENGTHS_N == T
MASK_NxT = np.arange(T)[None, :] < LENGTHS_N[:, None]


def _log_probs():
    rng = np.random.default_rng(0)
    old = rng.uniform(-3.0, -0.1, (G * 4, T))
    # Log-ratios on a grid from -0.7 to 1.4, shuffled: every region of the clipped objective
    # (below 1 - eps_low, inside, above 1 + eps_high, above the ratio cap 3) has tokens.
    log_ratio = rng.permutation(np.linspace(-0.7, 1.4, G * 4 * T)).reshape(G * 4, T)
    ref = old + rng.uniform(-0.5, 0.5, old.shape)
    entropy = rng.uniform(0.5, 3.0, old.shape)
    return [x.astype(np.float32) for x in (old + log_ratio, old, ref, entropy)]


LOGP_NxT, OLD_NxT, REF_NxT, ENTROPY_NxT = _log_probs()


class Outcome(NamedTuple):
    loss: float
    grad_NxT: np.ndarray  # d loss / d logp of every sampled token (0 where not trained on)
    kept_P: tuple[bool, ...]
    num_updates: int


def run_options(rl: RLConfig, maybe_jit) -> Outcome:
    """The fixed rollout through the host advantage code, the loop's schedule and the loss."""
    g = rl.num_generations
    scored = rollout_advantages(rl, REWARDS_N, ACCURACY_N, LENGTHS_N, TRUNCATED_N,
                                logp_NxL=OLD_NxT, ref_logp_NxL=REF_NxT)
    kept = [p for p in range(len(scored.keep_P)) if scored.keep_P[p]]
    assert kept, "the fixed rollout must keep a group in every case"
    rows_B = np.concatenate([np.arange(p * g, (p + 1) * g) for p in kept])
    # The loss reads only advantages and lengths from a group; row and tokens are placeholders.
    groups = [ScoredGroup(row=None, record_id=str(p), tokens_GxL=np.zeros((g, T), np.int32),
                          logprobs_GxL=OLD_NxT[p * g:(p + 1) * g],
                          lengths_G=LENGTHS_N[p * g:(p + 1) * g],
                          rewards_G=REWARDS_N[p * g:(p + 1) * g],
                          advantages_G=scored.advantages_N[p * g:(p + 1) * g]) for p in kept]
    groups = whiten_training_batch(groups, rl)
    loop = LoopConfig(num_steps=1, prompts_per_rollout=len(scored.keep_P),
                      groups_per_step=len(groups), minibatch_size=g, micro_batch_size=g)
    num_updates = len(step_minibatches(groups, loop, rl, np.random.default_rng(0)))
    advantages_B = np.concatenate([grp.advantages_G for grp in groups])

    def loss_fn(logp_NxT):
        loss, _ = grpo.policy_loss(
            logp_NxT[rows_B], OLD_NxT[rows_B], advantages_B, MASK_NxT[rows_B], rl,
            ref_logp_BxT=REF_NxT[rows_B], entropy_BxT=ENTROPY_NxT[rows_B])
        return loss

    loss, grad = maybe_jit(jax.value_and_grad(loss_fn))(LOGP_NxT)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    return Outcome(float(loss), np.asarray(grad), tuple(bool(k) for k in scored.keep_P),
                   num_updates)


# ----------------------------------------------------------------------------- the cases

LOSS, KEPT, UPDATES, REJECTED = "loss or gradient", "kept groups", "number of updates", "rejected"
BASE: dict[str, Any] = {"num_generations": G}
RLOO: dict[str, Any] = {"advantage": "rloo", "scale_rewards": "none"}
KL_IN_LOSS: dict[str, Any] = {"kl_coef": 0.1}
KL_IN_REWARD: dict[str, Any] = {"kl_coef": 0.1, "kl_placement": "reward"}


class Case(NamedTuple):
    field: str
    base: dict[str, Any]  # overrides of BASE in which the field matters
    value: Any  # the changed value
    effect: str  # what must change, or REJECTED


CASES = [
    Case("num_generations", {}, 2, LOSS),
    Case("num_generations", {}, 1, REJECTED),
    Case("advantage", {"scale_rewards": "none"}, "rloo", LOSS),
    Case("advantage", RLOO, "grpo", LOSS),
    Case("advantage", RLOO, "dr_grpo", LOSS),
    Case("advantage", {}, "rloo", REJECTED),  # with the group std
    Case("advantage", {}, "dr_grpo", REJECTED),
    Case("scale_rewards", {}, "batch", LOSS),
    Case("scale_rewards", {}, "none", LOSS),
    Case("scale_rewards", {"scale_rewards": "batch"}, "none", LOSS),
    Case("scale_rewards", {"whiten_advantages": True}, "batch", REJECTED),
    Case("scale_rewards", RLOO, "group", REJECTED),
    Case("adv_eps", {}, 0.5, LOSS),
    Case("adv_eps", {"scale_rewards": "batch"}, 0.5, LOSS),
    Case("adv_eps", {}, -1e-9, REJECTED),
    Case("whiten_advantages", {}, True, LOSS),
    Case("whiten_advantages", RLOO, True, LOSS),
    Case("whiten_advantages", KL_IN_REWARD, True, LOSS),
    Case("loss", {}, "dapo", LOSS),
    Case("loss", {}, "dr_grpo", LOSS),
    Case("loss", {}, "gspo", LOSS),
    Case("loss", {}, "cpgd", LOSS),
    Case("loss", {"loss": "dapo"}, "cpgd", LOSS),
    Case("clip_eps_low", {}, 0.1, LOSS),
    Case("clip_eps_low", {"loss": "cpgd"}, 0.1, LOSS),
    Case("clip_eps_low", {}, 1.0, REJECTED),
    Case("clip_eps_high", {}, 0.28, LOSS),
    Case("clip_eps_high", {"loss": "cpgd"}, 0.28, LOSS),
    Case("clip_eps_high", {}, 2.5, REJECTED),  # the ratio cap 3 would cut inside the clip
    Case("ratio_cap", {}, None, LOSS),
    Case("ratio_cap", {"loss": "gspo"}, 1.25, LOSS),
    Case("ratio_cap", {}, 1.2, REJECTED),
    Case("cpgd_drift_coef", {"loss": "cpgd"}, 0.1, LOSS),
    Case("cpgd_drift_coef", {"loss": "cpgd"}, -0.1, REJECTED),
    Case("kl_coef", {}, 0.1, LOSS),
    Case("kl_coef", {"kl_placement": "reward"}, 0.1, LOSS),
    Case("kl_coef", {}, -0.1, REJECTED),
    Case("kl_estimator", KL_IN_LOSS, "k1", LOSS),
    Case("kl_estimator", KL_IN_LOSS, "k2", LOSS),
    Case("kl_estimator", KL_IN_REWARD, "k1", LOSS),
    Case("kl_estimator", KL_IN_REWARD, "k2", LOSS),
    Case("kl_placement", KL_IN_LOSS, "reward", LOSS),
    Case("entropy_coef", {}, 0.01, LOSS),
    Case("entropy_coef", {"loss": "dr_grpo"}, 0.01, LOSS),
    Case("entropy_coef", {}, -0.01, REJECTED),
    Case("filter_enabled", {}, False, KEPT),
    Case("filter_low", {}, 0.3, KEPT),
    Case("filter_low", {}, 0.95, REJECTED),  # above filter_high
    Case("filter_high", {}, 0.7, KEPT),
    Case("filter_high", {}, 1.5, REJECTED),
    Case("ppo_epochs", {}, 2, UPDATES),
    Case("ppo_epochs", {}, 0, REJECTED),
    Case("max_response_length", {"loss": "dr_grpo"}, 8, LOSS),
    Case("max_response_length", {}, 0, REJECTED),
    Case("adora_enabled", {}, True, LOSS),
    Case("adora_factor", {"adora_enabled": True}, 0.5, LOSS),
    Case("adora_factor", {"adora_enabled": True}, 1.5, REJECTED),
]


def case_id(case: Case) -> str:
    base = ",".join(f"{k}={v}" for k, v in case.base.items())
    return f"{case.field}={case.value}" + (f"[{base}]" if base else "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_changing_the_option_changes_what_it_should(maybe_jit, case):
    base = RLConfig.from_dict({**BASE, **case.base})
    changed_values = {**BASE, **case.base, case.field: case.value}
    assert getattr(base, case.field) != case.value, "the case must change the field"
    if case.effect == REJECTED:
        with pytest.raises(InputError) as error:
            RLConfig.from_dict(changed_values)
        assert f"rl.{case.field}" in str(error.value)
        return
    before = run_options(base, maybe_jit)
    after = run_options(RLConfig.from_dict(changed_values), maybe_jit)
    if case.effect == LOSS:
        same_loss = np.isclose(after.loss, before.loss, rtol=1e-6, atol=1e-9)
        same_grad = np.allclose(after.grad_NxT, before.grad_NxT, rtol=1e-6, atol=1e-9)
        assert not (same_loss and same_grad), f"loss {before.loss} -> {after.loss}"
    elif case.effect == KEPT:
        assert after.kept_P != before.kept_P
    elif case.effect == UPDATES:
        assert after.num_updates != before.num_updates
    else:
        raise AssertionError(f"unknown effect {case.effect!r}")


def test_every_field_has_a_case():
    # A field whose every case is a rejection could not matter in any valid config: that is a
    # bug in the option, not in this test.
    fields = {field.name for field in dataclasses.fields(RLConfig)}
    acting = {case.field for case in CASES if case.effect != REJECTED}
    assert {case.field for case in CASES} <= fields
    assert fields - acting == set(), "fields without a case that shows them acting"


def test_every_choice_of_a_choice_field_is_reached():
    # For Literal and bool fields, each value appears on one side of an acting case.
    hints = typing.get_type_hints(RLConfig)
    reached: dict[str, set] = {}
    for case in CASES:
        if case.effect != REJECTED:
            base = RLConfig.from_dict({**BASE, **case.base})
            reached.setdefault(case.field, set()).update({getattr(base, case.field), case.value})
    for field in dataclasses.fields(RLConfig):
        hint = hints[field.name]
        if typing.get_origin(hint) is typing.Literal:
            choices = set(typing.get_args(hint))
        elif hint is bool:
            choices = {False, True}
        else:
            continue
        assert choices <= reached.get(field.name, set()), field.name
