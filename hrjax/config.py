"""One frozen config per run: the schema (`RunConfig`) and its strict conversion from the nested
mappings that `ml_collections` config files produce.

`from_mapping` checks every key and type against the dataclass fields and names the offending path
(`config.ppo.lrr: unknown key ...`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping, Optional

from hrjax.agent.networks import NetworkConfig
from hrjax.agent.ppo import PPOConfig
from hrjax.env.mdp import TEXT_CONTEXT_VIEW, EnvConfig
from hrjax.errors import HrjaxError
from hrjax.parallel import MeshConfig
from hrjax.pool import ModelSpec


class ConfigError(HrjaxError, ValueError):
    """A run config has an unknown key, a value of the wrong type or an invalid setting."""


MIXTURE = "mixture"  # config.task.name of a run over several tasks (config.task.mixture)


@dataclasses.dataclass(frozen=True)
class TaskPart:
    """One task (see `hrjax.tasks.datasets.TASKS`) in three disjoint parts: training prompts; selection
    prompts, which drive the training loop's eval/* metrics and so the best/ checkpoint; and the reported
    held-out prompts `hrjax evaluate` scores. A selection split equal to the training split takes the
    `num_select` examples that follow the first `num_train` (for tasks with no spare split)."""

    name: str = "basic_arithmetic"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the builder's options
    train_split: str = "train"
    select_split: str = "validation"
    eval_split: str = "test"
    num_train: int = 0  # 0: every example of the split
    num_select: int = 0
    num_eval: int = 0

    def check_splits(self, where: str) -> None:
        """Raises ConfigError (naming `where`, e.g. 'config.task') unless the three parts are disjoint."""
        if self.eval_split == self.train_split:
            raise ConfigError(
                f"{where}.eval_split and train_split are both '{self.train_split}': the report would score the "
                "prompts the router trained on. Set eval_split to a held-out split (e.g. 'test' or 'validation').")
        if self.select_split == self.eval_split:
            raise ConfigError(
                f"{where}.select_split and eval_split are both '{self.eval_split}': the best checkpoint would be "
                "chosen on the prompts the report scores. Set select_split to another split (e.g. 'validation'), "
                "or to train_split with num_train > 0 (it then takes the examples after the training ones).")
        if self.select_split == self.train_split and self.num_train < 1:
            raise ConfigError(
                f"{where}.select_split is the training split '{self.train_split}' but num_train is "
                f"{self.num_train} (every example): set num_train (the selection prompts are the num_select "
                "examples after the first num_train) or pick another select_split.")


@dataclasses.dataclass(frozen=True)
class TaskConfig(TaskPart):
    """What the router trains and is evaluated on: one task (the `TaskPart` fields), or with
    name = 'mixture' the tasks of `mixture`, each with its own options, splits and prompt counts (the
    parts of every task are concatenated in order; reports break results down per task)."""

    data_dir: str = "~/.cache/hrjax/data"
    manual_dir: Optional[str] = None
    mixture: tuple[TaskPart, ...] = ()
    # ask each family's models for its answer format (`hrjax.tasks.answer_format`: the family's instruction
    # after each question, its stop strings added to env.stop) and score only the answer in that format
    answer_format: bool = False

    def __post_init__(self):
        if self.name != MIXTURE:
            if self.mixture:
                raise ConfigError(f"config.task.mixture lists {len(self.mixture)} tasks but config.task.name is "
                                  f"'{self.name}': set config.task.name = '{MIXTURE}' to train on the mixture, or "
                                  "empty config.task.mixture.")
            self.check_splits("config.task")
            return
        if not self.mixture:
            raise ConfigError(f"config.task.name is '{MIXTURE}' but config.task.mixture is empty: list the tasks, "
                              "e.g. [dict(name='gsm8k', num_train=100), dict(name='humaneval')].")
        own = [f.name for f in dataclasses.fields(TaskPart)
               if f.name != "name" and getattr(self, f.name) != getattr(TaskPart(), f.name)]
        if own:
            raise ConfigError(f"config.task.{own[0]} is set but config.task.name is '{MIXTURE}': set it in each "
                              "entry of config.task.mixture instead.")
        for i, part in enumerate(self.mixture):
            if part.name == MIXTURE:
                raise ConfigError(f"config.task.mixture[{i}].name is '{MIXTURE}': a mixture lists tasks, "
                                  "not mixtures.")
            part.check_splits(f"config.task.mixture[{i}]")

    @property
    def parts(self) -> tuple[TaskPart, ...]:
        """The tasks of the run in order: the mixture's, or this one task."""
        return self.mixture if self.name == MIXTURE else (TaskPart(**{f.name: getattr(self, f.name)
                                                                       for f in dataclasses.fields(TaskPart)}),)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The Python training loop: how many iterations, and how often to log, evaluate and checkpoint."""

    num_iterations: int = 200
    iterations_per_step: int = 10  # jitted iterations between two Python steps (tree mode: one scan)
    eval_every: int = 5  # Python steps
    checkpoint_every: int = 1  # Python steps
    max_to_keep: int = 3
    best_metric: str = "eval/value"  # higher is better; the best checkpoint is kept apart
    cache_dir: str = "~/.cache/hrjax"  # response cache and path trees, shared between runs
    # child processes of this host, each pinned to its share of the cores, that a specialist pool's
    # build and `hrjax evaluate`'s lambda sweep are split over (`hrjax.local_processes`): 0 = one per
    # core (at most 8) when JAX computes on the CPU in a one-process job, else 1; 1 = all in this process
    local_processes: int = 0

    def __post_init__(self):
        for name in ("num_iterations", "iterations_per_step", "eval_every", "checkpoint_every", "max_to_keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.train.{name} must be >= 1, got {getattr(self, name)}.")
        if self.local_processes < 0:
            raise ConfigError(f"config.train.local_processes must be >= 0 (0: one per core on a CPU host), got "
                              f"{self.local_processes}.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`hrjax evaluate`: routers trained over `seeds` seeds, scored against the baselines at the env's
    cost_lambda and across `cost_lambdas` (the AIQ sweep; a lambda-conditioned router gives a curve)."""

    seeds: int = 3
    cost_lambdas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
    knn_k: int = 5

    def __post_init__(self):
        if self.seeds < 1 or self.knn_k < 1:
            raise ConfigError(f"config.evaluate.seeds and knn_k must be >= 1, got {self.seeds} and {self.knn_k}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    pool: tuple[ModelSpec, ...] = ()
    specialists: str = ""  # a recipe of `hrjax.specialists.build.RECIPES`: the pool is built (or reused) from it
    seed: int = 0
    mode: str = "tree"  # 'tree': train on the path tree of the training prompts; 'online': through the pool
    encoder: str = ""  # a HF directory of the context encoder; '': the offline all-MiniLM-L6-v2 package
    task: TaskConfig = TaskConfig()
    env: EnvConfig = EnvConfig()
    network: NetworkConfig = NetworkConfig()
    ppo: PPOConfig = PPOConfig()
    train: LoopConfig = LoopConfig()
    evaluate: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()  # the device mesh: 'data' splits episodes, 'model' pool models (scale-out)

    def __post_init__(self):
        if self.mode not in ("tree", "online"):
            raise ConfigError(f"config.mode must be 'tree' or 'online', got '{self.mode}'.")
        if not self.pool and not self.specialists:
            raise ConfigError("config.pool is empty: list at least one model (name, checkpoint, base_rate), or "
                              "name a specialist recipe in config.specialists.")
        if self.env.context_view == "auto":
            object.__setattr__(self, "env", dataclasses.replace(self.env, context_view=default_context_view(self.task)))
        if self.task.answer_format:
            stops = tuple(dict.fromkeys((*self.env.stop, *answer_format_stops(self.task))))
            object.__setattr__(self, "env", dataclasses.replace(self.env, stop=stops))

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def default_context_view(task: TaskConfig) -> str:
    """What `env.context_view = 'auto'` means for `task`: 'joined' for the specialist world (its answers are
    at most 16 tokens, so the joined context fits the encoder, and its results were measured so), the text
    view (question and latest answer embedded apart) for every task of real text."""
    return "joined" if task.name == "specialist_world" else TEXT_CONTEXT_VIEW


def answer_format_stops(task: TaskConfig) -> tuple[str, ...]:
    """The stop strings of the answer formats of `task`'s families (`config.task.answer_format`); a
    ConfigError when none of its tasks declares a format."""
    from hrjax.tasks.datasets import BUILDERS

    formats = [BUILDERS[p.name].ANSWER_FORMAT for p in task.parts
               if p.name in BUILDERS and BUILDERS[p.name].ANSWER_FORMAT is not None]
    if not formats:
        raise ConfigError(f"config.task.answer_format is set but none of the tasks {[p.name for p in task.parts]} "
                          "declares an answer format (the QA, maths and code benchmark families do): set it to "
                          "False.")
    return tuple(dict.fromkeys(stop for f in formats for stop in f.stop))


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str = "config"):
    """Builds dataclass `cls` from a nested mapping, checking every key and type."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {mapping!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key. Known keys of {where}: {sorted(fields)}.")
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in mapping.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}.")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (Mapping, dict) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return json.loads(json.dumps(dict(value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def run_config(mapping: Mapping[str, Any]) -> RunConfig:
    """The frozen `RunConfig` of a config file's nested mapping (e.g. `ConfigDict.to_dict()`)."""
    return from_mapping(RunConfig, mapping)


def field_defaults(cls: type) -> dict:
    """The JSON-ready default of every field of dataclass `cls` that has one, nested dataclasses as dicts."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))
    return out


def config_difference(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset = frozenset(),
                      where: str = "config", defaults: Any = None) -> Optional[str]:
    """The first path (not in `ignore`) where two config dicts differ, as 'path: saved vs current'. A key the
    saved config lacks (written by an older hrjax) counts as its default there (`defaults`, by default
    `field_defaults(RunConfig)`), so a field added since does not block a resume while it keeps its default."""
    if where in ignore:
        return None
    if defaults is None and where == "config":
        defaults = field_defaults(RunConfig)
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        defaults = defaults if isinstance(defaults, Mapping) else {}
        for key in sorted(set(saved) | set(current)):
            found = config_difference(saved.get(key, defaults.get(key, "<missing>")), current.get(key, "<missing>"),
                                      ignore, f"{where}.{key}", defaults.get(key))
            if found:
                return found
        return None
    return None if saved == current else f"{where}: {saved!r} vs {current!r}"


def resumable_keys(config: Mapping[str, Any]) -> frozenset:
    """The config paths a resumed run may change: how long it runs (unless a linear learning-rate
    schedule is spread over that length), how often it evaluates and checkpoints, and the device mesh."""
    keys = {"config.train.eval_every", "config.train.checkpoint_every", "config.train.max_to_keep",
            "config.evaluate", "config.mesh"}
    if config["ppo"]["lr_schedule"] == "constant":
        keys.add("config.train.num_iterations")
    return frozenset(keys)


def unknown_key(path: str) -> Optional[str]:
    """Why a dotted `config.` path names no `RunConfig` field (None when it does)."""
    cls, where = RunConfig, "config"
    for part in path.split(".")[1:]:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if fields is None:
            return f"{where} has no sub-keys, so {path} names nothing."
        if part not in fields:
            return f"{where}.{part}: unknown key. Known keys of {where}: {sorted(fields)}."
        hint = typing.get_type_hints(cls)[part]
        if hint in (dict, Mapping) or typing.get_origin(hint) in (dict, Mapping):
            return None  # free-form options (e.g. task.options.n_train)
        cls, where = hint, f"{where}.{part}"
    return None


def base_config():
    """An `ml_collections.ConfigDict` holding every `RunConfig` field at its default (an empty pool),
    so config files set what they change and `--config.a.b=value` can override any field."""
    from ml_collections import ConfigDict, config_dict

    def build(cls) -> ConfigDict:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else ())
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                out[f.name] = build(hint)
            elif default is None:
                (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
                out[f.name] = config_dict.placeholder(typing.get_origin(inner) or inner)
            elif dataclasses.is_dataclass(default):
                out[f.name] = build(type(default))
            else:
                out[f.name] = list(default) if isinstance(default, tuple) else default
        return ConfigDict(out)

    return build(RunConfig)
