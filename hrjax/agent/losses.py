"""Pure PPO building blocks over fixed-shape, masked trajectories (rlax style).

Shapes: T steps, B episodes, A actions. `valid` [T, B] marks the steps an episode actually took
(False after it ended); every mean below is over valid steps only.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp


def masked_mean(x: chex.Array, mask: chex.Array, count: Optional[chex.Array] = None) -> chex.Array:
    """Mean of `x` over entries where `mask` is True (0 if none). `count` [] is their number when known
    beforehand (default: sum(mask)); over a batch split across devices, a count summed once per update
    spares each minibatch a cross-device reduction that its gradient would have to wait for."""
    chex.assert_equal_shape([x, mask])
    mask = mask.astype(x.dtype)
    count = jnp.sum(mask) if count is None else count
    return jnp.sum(x * mask) / jnp.maximum(count, 1.0)


def gae(rewards: chex.Array, values: chex.Array, done: chex.Array, valid: chex.Array,
        bootstrap: chex.Array, gamma: float, lam: float) -> tuple[chex.Array, chex.Array]:
    """Generalised advantage estimation for finite-horizon episodes.

    Args:
      rewards, values: [T, B] float; done: [T, B] bool, the episode ended with step t (no value
        after it); valid: [T, B] bool; bootstrap: [B] value after step T-1 (used where not done).
      gamma: discount; lam: the GAE lambda.
    Returns (advantages [T, B], returns [T, B] = advantages + values), 0 on invalid steps.
    """
    chex.assert_rank([rewards, values, done, valid], 2)
    chex.assert_equal_shape([rewards, values, done, valid])
    chex.assert_shape(bootstrap, rewards.shape[1:])
    next_values = jnp.concatenate([values[1:], bootstrap[None]], axis=0)
    not_done = 1.0 - done.astype(rewards.dtype)
    deltas = rewards + gamma * not_done * next_values - values

    def backward(carry, step):
        delta, keep, is_valid = step
        advantage = delta + gamma * lam * keep * carry
        advantage = jnp.where(is_valid, advantage, 0.0)
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(bootstrap), (deltas, not_done, valid), reverse=True)
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def normalize_advantages(advantages: chex.Array, valid: chex.Array, eps: float = 1e-8) -> chex.Array:
    """Zero-mean, unit-std advantages over valid steps (invalid steps stay 0)."""
    mean = masked_mean(advantages, valid)
    std = jnp.sqrt(masked_mean(jnp.square(advantages - mean), valid))
    return jnp.where(valid, (advantages - mean) / (std + eps), 0.0)


def clipped_surrogate_loss(log_prob: chex.Array, old_log_prob: chex.Array, advantages: chex.Array,
                           valid: chex.Array, clip_epsilon: float,
                           count: Optional[chex.Array] = None) -> tuple[chex.Array, chex.Array]:
    """PPO's clipped policy loss (to minimise) and the fraction of valid steps that were clipped.

    All inputs [T, B] (or any equal shape); log-probs of the taken actions. `count`: see `masked_mean`.
    """
    chex.assert_equal_shape([log_prob, old_log_prob, advantages, valid])
    ratio = jnp.exp(log_prob - old_log_prob)
    clipped = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    loss = -masked_mean(jnp.minimum(ratio * advantages, clipped * advantages), valid, count)
    clip_fraction = masked_mean((jnp.abs(ratio - 1.0) > clip_epsilon).astype(ratio.dtype), valid, count)
    return loss, clip_fraction


def approx_kl(log_prob: chex.Array, old_log_prob: chex.Array, valid: chex.Array,
              count: Optional[chex.Array] = None) -> chex.Array:
    """KL(old || new) estimated from the taken actions' log-probs [T, B] (or any equal shape):
    mean(expm1(r) - r), r = log_prob - old_log_prob (Schulman's k3: unbiased and, unlike the
    signed mean(-r), never negative, so a threshold on it fires once the policy has moved).
    `count`: see `masked_mean`."""
    chex.assert_equal_shape([log_prob, old_log_prob, valid])
    log_ratio = jnp.where(valid, log_prob - old_log_prob, 0.0)
    return masked_mean(jnp.expm1(log_ratio) - log_ratio, valid, count)


def clipped_value_loss(values: chex.Array, old_values: chex.Array, returns: chex.Array,
                       valid: chex.Array, clip_epsilon: float, count: Optional[chex.Array] = None) -> chex.Array:
    """0.5 * max((v - R)^2, (v_old + clip(v - v_old, ±eps) - R)^2), averaged over valid steps
    (`count`: see `masked_mean`)."""
    chex.assert_equal_shape([values, old_values, returns, valid])
    clipped = old_values + jnp.clip(values - old_values, -clip_epsilon, clip_epsilon)
    return 0.5 * masked_mean(jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns)), valid, count)


def masked_log_softmax(logits: chex.Array, action_mask: chex.Array) -> chex.Array:
    """[..., A] log-probabilities with invalid actions at -inf-like values (excluded)."""
    chex.assert_equal_shape([logits, action_mask])
    return jax.nn.log_softmax(jnp.where(action_mask, logits, jnp.finfo(logits.dtype).min), axis=-1)


def entropy(logits: chex.Array, action_mask: chex.Array) -> chex.Array:
    """[...] entropy of the masked categorical over the last axis (invalid actions excluded)."""
    log_p = masked_log_softmax(logits, action_mask)
    return -jnp.sum(jnp.where(action_mask, jnp.exp(log_p) * log_p, 0.0), axis=-1)
