"""`hrjax export`: a serving bundle (`hrjax.serving.bundle`) from a trained run; `hrjax calibrate`: its
cost / quality table and the lambda a budget asks for.

  hrjax export --workdir=RUN --out=BUNDLE [--seed=S] [--checkpoint=latest|best] [--name=hrjax-router]
  hrjax calibrate --bundle=BUNDLE [--budget_cost=X | --budget_share=Y] [--json]

RUN (a local path or gs://) is a `hrjax train` workdir, or a `hrjax evaluate` workdir (`seed_<s>/` runs,
`sweep_routers.npz`): then the seed is the one with the best final `eval/value` on the selection prompts unless `--seed`
names one, and a fixed-lambda router brings its sweep's routers along (one parameter set per lambda),
so the bundle offers every trained trade-off. The policy and the context encoder are exported with
`jax.export` (StableHLO, symbolic batch and sequence dimensions, lowered for `PLATFORMS`); the
calibration table is read from the run's path tree (exact, and what the bundle's routes reproduce).
This module imports the training code; the bundle's reader (`hrjax.serving`) does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hrjax.config import RunConfig, run_config
from hrjax.errors import HrjaxError
from hrjax.rundir import as_path, is_remote, run_dir
from hrjax.serving.bundle import STOP, lambda_for_budget, load_bundle, offers, write_manifest

PLATFORMS = ("cpu", "cuda", "tpu")
DEFAULT_NAME = "hrjax-router"
ENCODER_BATCH = 32  # rows per encoder call (as `SentenceEncoder.encode`)
CONDITIONED_GRID = 9  # calibration points over a lambda-conditioned router's range (plus the sweep's lambdas)


class ExportError(HrjaxError, ValueError):
    """A run that cannot be exported as asked."""


class TrainedRouter(NamedTuple):
    config: RunConfig  # as the run saved it (pool resolved)
    workdir: Path  # the `hrjax train` workdir of the exported seed
    seed: int
    checkpoint: str  # 'latest' | 'best'
    step: int
    param_sets: dict  # {cost_lambda: params}; {None: params} for a lambda-conditioned router


# ------------------------------------------------------------------------------------------ reading the run

def seed_runs(workdir: Path) -> dict[int, Path]:
    """{seed: its train workdir} of an evaluate workdir (empty for a train workdir)."""
    runs = {}
    for path in workdir.glob("seed_*"):
        suffix = path.name[len("seed_"):]
        if suffix.isdigit() and (path / "config.json").is_file():
            runs[int(suffix)] = path
    return dict(sorted(runs.items()))


def best_seed(runs: dict[int, Path]) -> int:
    """The seed whose last logged `eval/value` (greedy router on the selection prompts) is highest."""
    from hrjax.metrics import read_metrics

    final = {}
    for seed, path in runs.items():
        values = [r["eval/value"] for r in read_metrics(path / "metrics.jsonl") if "eval/value" in r] if (
            path / "metrics.jsonl").is_file() else []
        if values:
            final[seed] = values[-1]
    if not final:
        raise ExportError(f"No seed run of {sorted(runs)} logged eval/value: pass --seed to choose one.")
    return max(final, key=lambda s: (final[s], -s))


def restore_params(run: Path, checkpoint: str) -> tuple[int, dict]:
    """The router parameters of a train workdir's latest (or best) checkpoint -> (step, params)."""
    import orbax.checkpoint as ocp

    directory = run / ("checkpoints" if checkpoint == "latest" else "best")
    directory = directory.absolute() if isinstance(directory, Path) else directory  # gs:// stays as it is
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such checkpoint directory; train the run first (or pass "
                          "--checkpoint=latest).")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        create=False, enable_async_checkpointing=False))
    try:
        step = manager.latest_step()
        if step is None:
            raise ExportError(f"{directory} holds no checkpoint: train the run first.")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    finally:
        manager.close()
    return step, jax.tree_util.tree_map(np.asarray, state["carry"]["params"])


def load_trained(workdir: str | Path, seed: Optional[int] = None, checkpoint: str = "latest") -> TrainedRouter:
    """The router a workdir holds (see the module docstring): its config and parameter sets."""
    from hrjax.pipeline import SWEEP_FILE, load_sweep

    # local, or gs:// (read through etils.epath; no gcsfs or credentials: one clear error first)
    workdir = run_dir(workdir, write=False) if is_remote(workdir) else as_path(workdir)
    if checkpoint not in ("latest", "best"):
        raise ExportError(f"--checkpoint must be 'latest' or 'best', got '{checkpoint}'.")
    runs = seed_runs(workdir)
    if runs:
        seed = best_seed(runs) if seed is None else seed
        if seed not in runs:
            raise ExportError(f"{workdir} has no run of seed {seed}; its seeds are {sorted(runs)}.")
        run = runs[seed]
    elif (workdir / "config.json").is_file():
        run = workdir
    else:
        raise ExportError(f"{workdir}: neither a `hrjax train` workdir (config.json, checkpoints/) nor a "
                          "`hrjax evaluate` workdir (seed_<s>/ runs): pass the --workdir a run wrote.")
    config = run_config(json.loads((run / "config.json").read_text()))
    step, params = restore_params(run, checkpoint)
    if config.ppo.conditioned:
        return TrainedRouter(config, run, config.seed, checkpoint, step, {None: params})
    param_sets = {float(config.env.cost_lambda): params}
    if runs and (workdir / SWEEP_FILE).is_file():
        seeds, sweep = load_sweep(workdir / SWEEP_FILE)
        if config.seed in seeds:
            index = seeds.index(config.seed)
            for lam, stacked in sweep.items():
                param_sets.setdefault(lam, jax.tree_util.tree_map(lambda x: np.asarray(x[index]), stacked))
    return TrainedRouter(config, run, config.seed, checkpoint, step, dict(sorted(param_sets.items())))


# ------------------------------------------------------------------------------------------ exporting

def _flat(params) -> dict[str, np.ndarray]:
    from flax.traverse_util import flatten_dict

    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_dict(params, sep="/").items()}


def _unflat(flat: dict):
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(dict(flat), sep="/")


def _specs(flat: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}


def export_policy(learner, flat_params: dict, embedding_dim: int) -> bytes:
    """The serialised `jax.export` of the learner's masked policy: (flat params, embedding [b, E],
    hop [b], cost features [b, 2], cost_lambda [b], action mask [b, A]) -> log-probabilities [b, A]."""
    def policy(params, embedding, hop, cost_features, cost_lambda, action_mask):
        return learner.apply(_unflat(params), embedding, hop, cost_features, cost_lambda, action_mask)[0]

    (b,) = jax.export.symbolic_shape("b")
    args = (_specs(flat_params), jax.ShapeDtypeStruct((b, embedding_dim), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, 2), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((b, learner.num_actions), jnp.bool_))
    return bytes(jax.export.export(jax.jit(policy), platforms=PLATFORMS)(*args).serialize())


def export_encoder(encoder, flat_params: dict) -> bytes:
    """The serialised `jax.export` of the packed sentence encoder: (flat params, input_ids [b, t],
    segment_ids [b, t]) -> [b, (t + 1) // 2, E] unit vectors, one per packed text
    (`hrjax.models.sentence_batches.pack`; b and t symbolic: t any row length up to the encoder's positions)."""
    from hrjax.models.encoder import packed_sentence_embeddings

    def embed(params, input_ids, segment_ids):
        return packed_sentence_embeddings(encoder.config, _unflat(params), input_ids, segment_ids)

    b, t = jax.export.symbolic_shape("b, t")
    args = (_specs(flat_params), jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32))
    return bytes(jax.export.export(jax.jit(embed), platforms=PLATFORMS)(*args).serialize())


def calibration_lambdas(config: RunConfig, trained: TrainedRouter) -> list[float]:
    """Where the table is computed: each trained lambda, or over a conditioned router's range a grid
    plus the sweep's lambdas inside it."""
    if not config.ppo.conditioned:
        return list(trained.param_sets)
    low, high = config.ppo.lambda_range
    grid = set(np.linspace(low, high, CONDITIONED_GRID).round(6).tolist())
    grid |= {float(x) for x in (*config.evaluate.cost_lambdas, config.env.cost_lambda) if low <= x <= high}
    return sorted(grid)


def calibration_table(trained: TrainedRouter, learner, progress: bool = True) -> dict:
    """The router's greedy paths on the selection prompts, read from the run's path tree, at each
    lambda: mean cost, mean quality, share of model calls that went to the most expensive model and
    models called per query."""
    from hrjax.agent.tree_mode import TreeEnv, greedy_paths
    from hrjax.train import load_data, load_or_build_tree

    config = trained.config
    data = load_data(config)
    tree = load_or_build_tree(config, data.examples, progress)
    rows = data.rows("select")
    env = TreeEnv.create(tree, config.env)
    rates = [m.base_rate for m in config.pool]
    expensive = int(np.argmax(rates))
    entries = []
    for lam in calibration_lambdas(config, trained):
        params = trained.param_sets[None if config.ppo.conditioned else lam]
        quality, cost, actions = map(np.asarray, greedy_paths(learner, params, env, rows, lam))
        called = (actions >= 0) & (actions < len(rates))
        entries.append({"cost_lambda": float(lam), "cost": float(cost.mean()), "quality": float(quality.mean()),
                        "expensive_share": float((actions == expensive).sum() / max(called.sum(), 1)),
                        "models_called": float(called.sum(0).mean())})
    return {"split": config.task.select_split, "num_prompts": int(rows.size), "most_expensive_model":
            config.pool[expensive].name, "entries": entries}


def place_checkpoint(source: str, root: Path, relative: str, limit_bytes: int, digests) -> dict:
    """A pool member's checkpoint (or tokenizer) in the bundle: a local one of at most `limit_bytes`
    is copied under `root/relative` -> {"bundled": path in the bundle}; else a reference
    {"path": absolute path, "fingerprint": `hrjax.pool.checkpoint_fingerprint`}."""
    from hrjax.pool import CHECKPOINT_FILES, checkpoint_fingerprint

    path = Path(source).expanduser()
    if not path.exists() and not source.startswith((".", "/")) and source.count("/") == 1:
        from hrjax.models.hf import resolve_hub

        path = resolve_hub(source)
    if not path.exists():
        raise ExportError(f"Pool checkpoint {source} does not exist: export on a machine that has it.")
    files = [path] if path.is_file() else sorted(
        {f for pattern in CHECKPOINT_FILES for f in path.glob(pattern) if f.is_file()})
    if sum(f.stat().st_size for f in files) > limit_bytes:
        return {"path": str(path.absolute()), "fingerprint": checkpoint_fingerprint(path, digests)}
    (root / relative).mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, root / relative / f.name)
    return {"bundled": f"{relative}/{path.name}" if path.is_file() else relative}


def export_bundle(workdir: str | Path, out: str | Path, seed: Optional[int] = None, checkpoint: str = "latest",
                  served_name: str = DEFAULT_NAME, copy_limit_mb: float = 256, progress: bool = True) -> Path:
    """Writes the bundle of the router in `workdir` to `out`, atomically (see the module docstring),
    then verifies it as a server would (`load_bundle`) -> `out`."""
    from safetensors.numpy import save_file

    from hrjax.agent.ppo import Learner
    from hrjax.env.mdp import observation_width
    from hrjax.fsutil import atomic_directory
    from hrjax.models.encoder import load_encoder
    from hrjax.pool import FileDigests, digest_index

    if "@" in served_name or not served_name:
        raise ExportError(f"--name '{served_name}' must be non-empty and without '@' (it prefixes '@cost=X').")
    workdir = as_path(workdir)
    trained = load_trained(workdir, seed, checkpoint)
    config = trained.config
    actions = [m.name for m in config.pool] + ([STOP] if config.env.stop_action else [])
    learner = Learner(config.ppo, config.network, len(actions), config.env.num_hops, config.train.num_iterations)
    encoder = load_encoder(config.encoder or None)
    encoder_params = _flat(jax.device_get(encoder.params))
    calibration = calibration_table(trained, learner, progress)
    if config.ppo.conditioned:
        low, high = config.ppo.lambda_range
        default_lambda = float(min(max(config.env.cost_lambda, low), high))
    else:
        default_lambda = float(config.env.cost_lambda)
    digests = FileDigests(digest_index(config))
    with atomic_directory(Path(out).expanduser()) as tmp:
        (tmp / "policy").mkdir()
        param_sets = []
        for i, (lam, params) in enumerate(trained.param_sets.items()):
            save_file(_flat(params), str(tmp / "policy" / f"params_{i}.safetensors"))
            param_sets.append({"cost_lambda": lam, "params": f"policy/params_{i}.safetensors"})
        first = _flat(next(iter(trained.param_sets.values())))
        width = observation_width(encoder.dim, config.env.view)
        (tmp / "policy" / "exported.bin").write_bytes(export_policy(learner, first, width))
        (tmp / "encoder").mkdir()
        save_file(encoder_params, str(tmp / "encoder" / "params.safetensors"))
        (tmp / "encoder" / "exported.bin").write_bytes(export_encoder(encoder, encoder_params))
        encoder.tokenizer.save_pretrained(str(tmp / "encoder" / "tokenizer"))
        pool = []
        for spec in config.pool:
            limit = int(copy_limit_mb * 2**20)
            pool.append({"name": spec.name, "base_rate": spec.base_rate, "use_chat_template": spec.use_chat_template,
                         "prompt_template": spec.prompt_template, "dtype": spec.dtype,
                         "checkpoint": place_checkpoint(spec.checkpoint, tmp, f"pool/{spec.name}", limit, digests),
                         "tokenizer": None if spec.tokenizer is None else place_checkpoint(
                             spec.tokenizer, tmp, f"pool/{spec.name}.tokenizer", limit, digests)})
        (tmp / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        env = config.to_dict()["env"]
        write_manifest(tmp, {
            "served_name": served_name, "actions": actions, "env": env, "pool": pool,
            "policy": {"exported": "policy/exported.bin", "platforms": list(PLATFORMS),
                       "conditioned": config.ppo.conditioned, "lambda_range": config.ppo.lambda_range,
                       "default_lambda": default_lambda, "param_sets": param_sets},
            "encoder": {"exported": "encoder/exported.bin", "params": "encoder/params.safetensors",
                        "tokenizer": "encoder/tokenizer", "platforms": list(PLATFORMS), "dim": encoder.dim,
                        "max_seq_length": encoder.max_seq_length, "do_lower_case": encoder.do_lower_case,
                        "batch_size": ENCODER_BATCH,
                        "pad_token_id": encoder.tokenizer.pad_token_id or 0, "source": encoder.source},
            "calibration": "calibration.json", "config": "config.json",
            "source": {"workdir": str(workdir.absolute() if isinstance(workdir, Path) else workdir),
                       "seed": trained.seed, "checkpoint": checkpoint, "step": trained.step},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    digests.save()
    load_bundle(out)
    return Path(out).expanduser()


# ------------------------------------------------------------------------------------------ command lines

def main(argv) -> int:
    parser = argparse.ArgumentParser(prog=argv[0], description="Write a serving bundle from a trained run.")
    parser.add_argument("--workdir", required=True, help="a `hrjax train` or `hrjax evaluate` workdir")
    parser.add_argument("--out", required=True, help="the bundle directory to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=None, help="an evaluate run's seed (default: best eval/value)")
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                        help="the run's latest checkpoint (what `hrjax evaluate` scored) or its best/ one")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the served model name")
    parser.add_argument("--copy_limit_mb", type=float, default=256,
                        help="pool checkpoints up to this size are copied in; larger ones are referenced")
    parser.add_argument("--noprogress", action="store_true")
    args = parser.parse_args(argv[1:])
    start = time.perf_counter()
    try:
        out = export_bundle(args.workdir, args.out, args.seed, args.checkpoint, args.name, args.copy_limit_mb,
                            not args.noprogress)
    except HrjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bundle = load_bundle(out)
    size = sum(f["size"] for f in bundle.manifest["files"].values())
    source = bundle.manifest["source"]
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s): seed {source['seed']}, "
          f"{source['checkpoint']} checkpoint (step {source['step']})")
    print(_calibration_text(bundle))
    return 0


def _calibration_text(bundle) -> str:
    table, policy = bundle.calibration, bundle.manifest["policy"]
    lines = [f"calibration on {table['num_prompts']} '{table['split']}' prompts (share: calls to "
             f"{table['most_expensive_model']}):", "  lambda      cost   quality   share   models/query"]
    lines += [f"  {e['cost_lambda']:<8g} {e['cost']:7.4f}   {e['quality']:7.4f}  {e['expensive_share']:6.3f}   "
              f"{e['models_called']:.2f}" for e in table["entries"]]
    lines.append("served models:")
    lines += [f"  {name}  (lambda {lam:g})" for name, lam in
              offers(table, bundle.served_name, policy["default_lambda"]).items()]
    return "\n".join(lines)


def calibrate_main(argv) -> int:
    parser = argparse.ArgumentParser(prog=argv[0], description="A bundle's mean cost and quality at each lambda, "
                                     "and the lambda that meets a budget.")
    parser.add_argument("--bundle", required=True)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget_cost", type=float, help="mean normalised cost per query")
    budget.add_argument("--budget_share", type=float, help="share of calls to the most expensive model")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv[1:])
    try:
        bundle = load_bundle(args.bundle)
        table = bundle.calibration
        chosen = None
        if args.budget_cost is not None or args.budget_share is not None:
            chosen = lambda_for_budget(table, cost=args.budget_cost, share=args.budget_share)
    except HrjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"calibration": table, "chosen": chosen, "offers": offers(
            table, bundle.served_name, bundle.manifest["policy"]["default_lambda"])}))
        return 0
    print(_calibration_text(bundle))
    if chosen is not None:
        what = f"mean cost <= {args.budget_cost:g}" if args.budget_cost is not None else (
            f"share of calls to {table['most_expensive_model']} <= {args.budget_share:g}")
        print(f"{what}: cost_lambda {chosen['cost_lambda']:g} (cost {chosen['cost']:.4f}, quality "
              f"{chosen['quality']:.4f}); serve it as {bundle.served_name}@lambda={chosen['cost_lambda']:g}")
    return 0
