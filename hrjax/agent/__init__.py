"""The router: policy/value networks, PPO losses and the jit-compiled learner."""
