"""The decode profiler's reading of XLA:CPU's trace: each traced op maps back to the model op it came from."""

import jax
import jax.numpy as jnp

from experiments.profile_decode import op_groups, thunk_times


def test_traced_ops_map_to_their_model_op_without_the_layer_index(tmp_path):
    def layer(x, w):
        with jax.named_scope("mlp"), jax.named_scope("layers_3"), jax.named_scope("gate_proj"):
            return jnp.tanh(x @ w)

    x, w = jnp.ones((16, 64)), jnp.ones((64, 128))
    program = jax.jit(layer)
    groups = op_groups(program.lower(x, w).compile().as_text())
    assert ("mlp/gate_proj/dot_general", "dot") in groups.values()  # XLA's own dot: the suite's precise matmuls
    program(x, w).block_until_ready()
    with jax.profiler.trace(tmp_path, create_perfetto_trace=True):
        program(x, w).block_until_ready()
    traced = {groups[name][0] for name in thunk_times(tmp_path) if name in groups}
    assert "mlp/gate_proj/dot_general" in traced
