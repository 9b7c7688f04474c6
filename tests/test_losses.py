"""PPO losses and GAE against hand-worked numbers and independent NumPy references, jitted and not."""

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from hrjax.agent import losses, ppo


def numpy_gae(rewards, values, done, valid, bootstrap, gamma, lam):
    """A per-episode loop, written independently of the scan."""
    t_max, batch = rewards.shape
    advantages = np.zeros_like(rewards)
    for b in range(batch):
        running = 0.0
        for t in reversed(range(t_max)):
            if not valid[t, b]:
                running = 0.0
                continue
            next_value = 0.0 if done[t, b] else (values[t + 1, b] if t + 1 < t_max else bootstrap[b])
            delta = rewards[t, b] + gamma * next_value - values[t, b]
            running = delta + (0.0 if done[t, b] else gamma * lam * running)
            advantages[t, b] = running
    return advantages, np.where(valid, advantages + values, 0.0)


def random_episodes(rng, t_max=5, batch=7):
    lengths = rng.integers(1, t_max + 1, size=batch)
    steps = np.arange(t_max)[:, None]
    valid = steps < lengths[None]
    done = steps == (lengths[None] - 1)
    done &= rng.random(batch)[None] < 0.7  # some episodes are cut by the horizon, not done: bootstrap
    return (rng.normal(size=(t_max, batch)).astype(np.float32), rng.normal(size=(t_max, batch)).astype(np.float32),
            done, valid, rng.normal(size=batch).astype(np.float32))


class LossesTest(chex.TestCase, parameterized.TestCase):

    @chex.all_variants
    def test_gae_hand_worked(self):
        rewards = jnp.array([[0.0, 0.3], [0.0, 9.0], [1.0, 9.0]])
        values = jnp.array([[0.5, 0.1], [0.4, 5.0], [0.8, 5.0]])
        done = jnp.array([[False, True], [False, False], [True, False]])
        valid = jnp.array([[True, True], [True, False], [True, False]])
        gae = self.variant(lambda *a: losses.gae(*a, gamma=0.9, lam=0.8))
        advantages, returns = gae(rewards, values, done, valid, jnp.zeros(2))
        np.testing.assert_allclose(advantages, [[0.19408, 0.2], [0.464, 0.0], [0.2, 0.0]], atol=1e-6)
        np.testing.assert_allclose(returns, [[0.69408, 0.3], [0.864, 0.0], [1.0, 0.0]], atol=1e-6)

    @chex.all_variants
    @parameterized.parameters((0.99, 0.95), (1.0, 1.0), (0.5, 0.0))
    def test_gae_matches_numpy_reference(self, gamma, lam):
        rng = np.random.default_rng(0)
        for _ in range(5):
            rewards, values, done, valid, bootstrap = random_episodes(rng)
            got = self.variant(lambda *a: losses.gae(*a, gamma=gamma, lam=lam))(rewards, values, done, valid, bootstrap)
            want = numpy_gae(rewards, values, done, valid, bootstrap, gamma, lam)
            np.testing.assert_allclose(got[0], want[0], atol=1e-5)
            np.testing.assert_allclose(got[1], want[1], atol=1e-5)

    @chex.all_variants
    def test_clipped_surrogate_and_value_losses(self):
        rng = np.random.default_rng(1)
        shape = (4, 6)
        log_prob, old_log_prob = (rng.normal(scale=0.3, size=shape).astype(np.float32) for _ in range(2))
        advantages = rng.normal(size=shape).astype(np.float32)
        valid = rng.random(shape) < 0.8
        loss, clip_fraction = self.variant(lambda *a: losses.clipped_surrogate_loss(*a, clip_epsilon=0.2))(
            log_prob, old_log_prob, advantages, valid)
        ratio = np.exp(log_prob - old_log_prob)
        per_step = np.minimum(ratio * advantages, np.clip(ratio, 0.8, 1.2) * advantages)
        np.testing.assert_allclose(loss, -per_step[valid].mean(), rtol=1e-5)
        np.testing.assert_allclose(clip_fraction, (np.abs(ratio - 1) > 0.2)[valid].mean(), rtol=1e-6)

        values, old_values, returns = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
        value_loss = self.variant(lambda *a: losses.clipped_value_loss(*a, clip_epsilon=0.2))(
            values, old_values, returns, valid)
        clipped = old_values + np.clip(values - old_values, -0.2, 0.2)
        want = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2)[valid].mean()
        np.testing.assert_allclose(value_loss, want, rtol=1e-5)

        # a count given beforehand (a sharded batch's, summed once per update) is the mean's denominator
        count = 2.0 * valid.sum()
        halved = self.variant(lambda *a: losses.clipped_surrogate_loss(*a, clip_epsilon=0.2, count=count))(
            log_prob, old_log_prob, advantages, valid)
        np.testing.assert_allclose(halved, (loss / 2, clip_fraction / 2), rtol=1e-5)
        np.testing.assert_allclose(self.variant(lambda *a: losses.clipped_value_loss(*a, clip_epsilon=0.2,
                                                                                    count=count))(
            values, old_values, returns, valid), want / 2, rtol=1e-5)
        np.testing.assert_allclose(self.variant(lambda *a: losses.approx_kl(*a, count=count))(
            log_prob, old_log_prob, valid), self.variant(losses.approx_kl)(log_prob, old_log_prob, valid) / 2,
            rtol=1e-5)

    @chex.all_variants
    def test_surrogate_hand_worked(self):
        # ratio 1.5 with A=+1 is clipped to 1.2; ratio 0.5 with A=-1 is clipped to 0.8 -> -0.8.
        log_prob = jnp.log(jnp.array([1.5, 0.5, 1.0]))
        loss, clip_fraction = self.variant(lambda *a: losses.clipped_surrogate_loss(*a, clip_epsilon=0.2))(
            log_prob, jnp.zeros(3), jnp.array([1.0, -1.0, 2.0]), jnp.array([True, True, False]))
        np.testing.assert_allclose(loss, -(1.2 - 0.8) / 2, rtol=1e-6)
        np.testing.assert_allclose(clip_fraction, 1.0)

    @chex.all_variants
    def test_masked_entropy_and_normalisation(self):
        logits = jnp.array([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
        mask = jnp.array([[True, True, False], [True, True, True]])
        ent = self.variant(losses.entropy)(logits, mask)
        p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
        np.testing.assert_allclose(ent, [np.log(2.0), -(p * np.log(p)).sum()], rtol=1e-6)
        adv = jnp.array([[1.0, 2.0], [3.0, 100.0]])
        valid = jnp.array([[True, True], [True, False]])
        out = self.variant(losses.normalize_advantages)(adv, valid)
        v = np.array([1.0, 2.0, 3.0])
        np.testing.assert_allclose(np.asarray(out)[np.asarray(valid)], (v - v.mean()) / v.std(), rtol=1e-5)
        assert out[1, 1] == 0.0

    @chex.all_variants
    def test_explained_variance_and_action_histogram(self):
        returns = jnp.array([[1.0, 2.0], [3.0, 50.0]])
        valid = jnp.array([[True, True], [True, False]])
        ev = self.variant(ppo.explained_variance)
        np.testing.assert_allclose(ev(returns, returns, valid), 1.0)
        np.testing.assert_allclose(ev(jnp.full_like(returns, 2.0), returns, valid), 0.0, atol=1e-6)
        values = jnp.array([[1.5, 2.0], [2.0, 0.0]])  # residuals -0.5, 0, 1 -> var 7/18; returns var 2/3
        np.testing.assert_allclose(ev(values, returns, valid), 1.0 - (7 / 18) / (2 / 3), rtol=1e-5)
        zeros = jnp.zeros((2, 3))
        valid = jnp.array([[1, 1, 1], [1, 0, 1]], bool)
        trajectory = ppo.Trajectory(zeros[..., None], zeros, zeros, zeros, jnp.ones((2, 3, 4), bool),
                                    jnp.array([[0, 3, 3], [1, 1, 2]]), zeros, zeros, valid)
        hist = self.variant(ppo.action_histogram, static_argnums=1)(trajectory, 4)
        np.testing.assert_allclose(hist, [[1 / 3, 0, 0, 2 / 3], [0, 0.5, 0.5, 0]], rtol=1e-6)

    @chex.all_variants
    def test_approx_kl_is_the_non_negative_k3_estimator(self):
        # r = log(p / p_old) = log 2, log 1/2, 0 (the fourth step is invalid): k3 = mean(expm1(r) - r)
        log_prob = jnp.log(jnp.array([2.0, 0.5, 1.0, 30.0]))
        valid = jnp.array([True, True, True, False])
        kl = self.variant(losses.approx_kl)(log_prob, jnp.zeros(4), valid)
        np.testing.assert_allclose(kl, ((1 - np.log(2)) + (np.log(2) - 0.5)) / 3, rtol=1e-6)
        # a policy that raised every taken action's probability: the signed mean(old - new) is < 0, k3 is not
        rng = np.random.default_rng(2)
        old_log_prob = np.log(rng.uniform(0.1, 0.5, size=(3, 8))).astype(np.float32)
        log_prob = old_log_prob + rng.uniform(0.01, 0.3, size=(3, 8)).astype(np.float32)
        valid = rng.random((3, 8)) < 0.8
        assert float(np.mean((old_log_prob - log_prob)[valid])) < 0
        kl = self.variant(losses.approx_kl)(log_prob, old_log_prob, valid)
        r = (log_prob - old_log_prob)[valid]
        np.testing.assert_allclose(kl, np.mean(np.expm1(r) - r), rtol=1e-5)
        assert float(kl) > 0

    @chex.all_variants
    def test_models_called_counts_hops_without_stop(self):
        # 2 models, STOP = action 2; episodes: [0, 1], [1, STOP], [0, STOP], [1] cut short (invalid step 2)
        action = jnp.array([[0, 1, 0, 1], [1, 2, 2, 0]])
        valid = jnp.array([[True, True, True, True], [True, True, True, False]])
        zeros = jnp.zeros((2, 4))
        trajectory = ppo.Trajectory(zeros[..., None], zeros, zeros, zeros, jnp.ones((2, 4, 3), bool), action, zeros,
                                    zeros, valid)
        calls = self.variant(ppo.models_called, static_argnums=1)(trajectory, 2)
        np.testing.assert_array_equal(calls, [2, 1, 1, 1])
