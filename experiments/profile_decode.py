"""Where a batched decode step's time goes: SmolLM2-135M (the offline pool's first model), one static
`generate_tokens` call of `--batch` rows x `--new_tokens` greedy tokens (EOS ignored), traced with JAX's
profiler. XLA:CPU records each op it runs (a thunk); this groups them by the model op they come from
(layer index dropped: 'mlp/gate_proj/dot_general' over all layers) and prints one JSON line: the wall
ms per generated token (untraced, prefill included), and per group its thread-ms per token (ops that
run side by side on the host's threads both count) and what runs it. An op that hands its work to
another thread pool and returns (XLA's own dot, on Eigen's threads) counts only its hand-off, so
`traced_thread_ms_per_token` well under the wall time says the breakdown misses that work. `--kernel=xla` routes matmuls to XLA's own dot instead of
its default library (`hrjax.runtime.use_precise_cpu_matmuls`), to compare the two on this host.

  python -m experiments.profile_decode --batch=16 [--kernel=xla]
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch", 16, "rows decoded together")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "tokens per row")
_KERNEL = flags.DEFINE_enum("kernel", "default", ["default", "xla"], "matmuls through XLA's default library or its own dot")
_TOP = flags.DEFINE_integer("top", 16, "op groups printed")

LIBRARIES = {"ynn": "ynnpack", "xnn": "xnnpack", "onednn": "onednn"}


def op_groups(compiled_hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (the model op it comes from, without its layer index; what runs it: a
    matmul library, or the instruction's opcode / fusion kind)."""
    groups = {}
    for line in compiled_hlo.splitlines():
        instruction = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", line)
        op_name = re.search(r'op_name="([^"]+)"', line)
        if not (instruction and op_name):
            continue
        library = re.search(r'"kind":"__([a-z]+)_fusion"', line)
        fusion_kind = re.search(r"kind=(k\w+)", line)
        runner = (LIBRARIES.get(library.group(1), library.group(1)) if library
                  else fusion_kind.group(1) if fusion_kind else instruction.group(2))
        scopes = [scope for scope in op_name.group(1).split("/") if not re.fullmatch(r"layers_\d+", scope)]
        groups[instruction.group(1)] = ("/".join(scopes[-3:]), runner)
    return groups


def thunk_times(trace_dir: Path) -> collections.Counter:
    """Summed duration (us) of each traced event name in the perfetto trace under `trace_dir`."""
    trace = json.load(gzip.open(next(trace_dir.rglob("*.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            times[event["name"]] += event.get("dur", 0)
    return times


def main(argv):
    del argv
    batch, new_tokens, top = _BATCH.value, _NEW_TOKENS.value, _TOP.value
    if _KERNEL.value == "xla":
        from hrjax.runtime import use_precise_cpu_matmuls

        use_precise_cpu_matmuls()
    import jax

    from hrjax.benchmarks.common import best_seconds, experiment_config, host_info
    from hrjax.generate.sampler import SamplingParams
    from hrjax.pool import load_model

    with tempfile.TemporaryDirectory(prefix="hrjax-profile-") as root:
        sampler = load_model(experiment_config("cpu_pool", root=Path(root)).pool[0]).sampler
        prompts = [[1] + list(range(100, 140 + i % 8)) for i in range(batch)]
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        sampler.generate_tokens(prompts, sampling)  # compile
        wall = best_seconds(lambda: sampler.generate_tokens(prompts, sampling), repeats=2)
        with jax.profiler.trace(Path(root) / "trace", create_perfetto_trace=True):
            sampler.generate_tokens(prompts, sampling)
        times = thunk_times(Path(root) / "trace")
        groups = op_groups(sampler.lower(prompts, sampling).compile().as_text())
    per_group, kernels = collections.Counter(), {}
    for name, micros in times.items():
        if name in groups:
            op, library = groups[name]
            per_group[op] += micros
            kernels[op] = library
    result = {**host_info(), "batch": batch, "new_tokens": new_tokens,
              "wall_ms_per_token": round(wall / new_tokens * 1e3, 2),
              "traced_thread_ms_per_token": round(sum(per_group.values()) / new_tokens / 1e3, 2),
              "ops": [{"op": op, "kernel": kernels[op], "thread_ms_per_token": round(micros / new_tokens / 1e3, 2)}
                      for op, micros in per_group.most_common(top)]}
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
