"""The router's policy and value networks (Flax Linen).

Inputs per state: the context embedding [E] (the encoder's width times the parts of the env's context
view, `hrjax.env.mdp.observation_width`; the first layer's input size follows it at init), the hop index
(a learned stage embedding, as the paper), the cost features [F] and, for a lambda-conditioned router,
lambda itself.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The architecture; the action and hop counts come from the pool and env."""

    hidden: int = 128
    layers: int = 2
    stage_dim: int = 16
    shared_torso: bool = True

    def __post_init__(self):
        if self.hidden < 1 or self.layers < 1 or self.stage_dim < 1:
            raise ValueError(f"network.hidden, layers and stage_dim must be >= 1, got {self.hidden}, {self.layers} "
                             f"and {self.stage_dim}.")


class ConcatDense(nn.Module):
    """`nn.Dense` over the concatenation of `parts` (each [..., D_i]), with the same parameters (kernel
    [sum D_i, features], bias), without building the concatenation: the sum of each part times its rows
    of the kernel. The gradient then reaches each input part on its own, so a wide constant input (the
    context embedding) costs no input gradient when only a narrow learned one (the stage embedding)
    needs it."""

    features: int

    @nn.compact
    def __call__(self, parts):
        widths = [part.shape[-1] for part in parts]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (sum(widths), self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        starts = np.cumsum([0, *widths])
        return sum(part @ kernel[start:end] for part, start, end in zip(parts, starts[:-1], starts[1:])) + bias


class RouterNetwork(nn.Module):
    """-> (logits [..., A], value [...]). Invalid actions are masked by the caller."""

    config: NetworkConfig
    num_actions: int
    num_hops: int

    @nn.compact
    def __call__(self, embedding, hop, cost_features, cost_lambda: Optional[jnp.ndarray] = None):
        cfg = self.config
        stage = nn.Embed(self.num_hops + 1, cfg.stage_dim, name="stage_embedding")(hop)
        parts = [embedding, stage, cost_features]
        if cost_lambda is not None:
            parts.append(cost_lambda[..., None])

        def torso(name):
            h = nn.tanh(ConcatDense(cfg.hidden, name=f"{name}_0")(parts))
            for i in range(1, cfg.layers):
                h = nn.tanh(nn.Dense(cfg.hidden, name=f"{name}_{i}")(h))
            return h

        policy_h = torso("torso")
        value_h = policy_h if cfg.shared_torso else torso("value_torso")
        logits = nn.Dense(self.num_actions, kernel_init=nn.initializers.orthogonal(0.01), name="policy")(policy_h)
        value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0), name="value")(value_h)[..., 0]
        return logits, value
