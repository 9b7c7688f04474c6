"""What every task family shares: the TFDS builder base classes, the example format and helpers.

Every task is a `tfds.core.GeneratorBasedBuilder` that writes ArrayRecord files (never TFRecord:
TFDS's TFRecord writer and `tfds.load`/`as_dataset` need TensorFlow). Writing works without TF
because TFDS serialises examples with its own vendored `tf.train.Example` protos
(`tensorflow_datasets.proto.tf_example_pb2`, plain protobuf) and the ArrayRecord writer comes from
the `array_record` package; reading goes through `builder.as_data_source()` / `tfds.data_source()`,
which parse records with TFDS's numpy example parser. `download_and_prepare` writes into
`<data_dir>/<name>/<config>/incomplete.XXXXXX_<version>/` and renames it onto
`<data_dir>/<name>/<config>/<version>/` only once every split is written, so a reader never sees a
half-built dataset. (TFDS 4.9.10 also needs `importlib_resources` at build time on Python >= 3.9
but does not declare it, tensorflow/datasets#11212: the project pins it.)

Every example has the same six string features:

- `id`: unique within the task (and stable across rebuilds from the same files);
- `task`: the task name (`gsm8k`, `math`, `mbpp`, `humaneval`, `triviaqa`, `hotpotqa`, `nq_open`,
  or the reasoning-gym dataset name such as `chain_sum`);
- `question`: the text the pool is asked;
- `answers`: a JSON-encoded list of gold answers (strings);
- `scorer`: one of `SCORERS`;
- `metadata`: a JSON object with what the scorer needs (see each builder).

Each family is one module of `hrjax.tasks.families` (its sources and options are in its builder's
docstring); manual-dir families read only the splits present in the files, and where upstream has a
train split but no validation split, validation is carved out of train (see `carve`).

A builder's options live in its `TaskBuilderConfig`; the config name is a digest of the options, so
every distinct option set is cached in its own directory. Make configs with
`Builder.make_config(**options)`.
"""

from __future__ import annotations

import dataclasses
import decimal
import fractions
import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from hrjax.errors import HrjaxError
from hrjax.tasks import scorers

log = logging.getLogger(__name__)


class _QuietHrjaxConfigs(logging.Filter):
    """Drops two absl warnings TFDS emits for every option set of ours: 'Using custom data
    configuration' (our configs are made per option set by design) and 'Variant folder ... has no
    dataset_info.json' (printed before a first build)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover - never break logging
            return True
        return "TaskBuilderConfig(" not in msg and not (
            "/hrjax_" in msg and "has no dataset_info.json" in msg
        )


logging.getLogger("absl").addFilter(_QuietHrjaxConfigs())

SCORERS = tuple(scorers.SCORERS)
SPLITS = ("train", "validation", "test")
FIELDS = ("id", "task", "question", "answers", "scorer", "metadata")
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}


class TaskDataError(HrjaxError, FileNotFoundError):
    """Data files a task needs are missing, or hold nothing usable."""


class TaskConfigError(HrjaxError, ValueError):
    """An unknown task, an unknown or invalid option, or a split that was not built."""


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One task item, as stored, with `answers` and `metadata` decoded from JSON."""

    id: str
    task: str
    question: str
    answers: tuple[str, ...]
    scorer: str
    metadata: Mapping[str, Any] = dataclasses.field(hash=False, compare=True)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the builders.


def make_example(
    id: str, task: str, question: str, answers: Sequence[str], scorer: str, metadata: Mapping
) -> dict[str, str]:
    """One example as the builders write it (every feature a string)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; expected one of {SCORERS}")
    return {
        "id": str(id),
        "task": task,
        "question": question,
        "answers": json.dumps([str(a) for a in answers], ensure_ascii=False),
        "scorer": scorer,
        "metadata": json.dumps(jsonable(metadata), ensure_ascii=False, sort_keys=True),
    }


def jsonable(value: Any, lossy: bool = False) -> Any:
    """`value` with tuples/sets/numpy values turned into JSON types. Fractions and Decimals become
    strings; any other type raises TypeError, or with `lossy=True` becomes its `str()`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [jsonable(v, lossy) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, lossy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, lossy) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v, lossy) for v in value), key=repr)
    if isinstance(value, (fractions.Fraction, decimal.Decimal)) or lossy:
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r} as JSON metadata")


def stable_unit(*parts: str) -> float:
    """A number in [0, 1) fixed by `parts` (sha256), independent of PYTHONHASHSEED."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def carve(
    rows: Sequence[dict], fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Splits `rows` into (kept, carved): `round(fraction * len(rows))` rows are carved out.

    Which rows: sort by `id`, then take the first ones in `np.random.default_rng(seed).permutation`
    order. Deterministic given the rows' ids, whatever order the files list them in.
    """
    rows = sorted(rows, key=lambda r: r["id"])
    n_carved = int(round(fraction * len(rows)))
    order = np.random.default_rng(seed).permutation(len(rows))
    chosen = set(order[:n_carved].tolist())
    kept = [r for i, r in enumerate(rows) if i not in chosen]
    carved = [r for i, r in enumerate(rows) if i in chosen]
    return kept, carved


def unique_ids(rows: Iterable[dict]) -> list[dict]:
    """Rows with duplicate ids renamed `id#2`, `id#3`, ... (TFDS needs unique keys)."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        rid = row["id"]
        if rid in seen:
            seen[rid] += 1
            row = {**row, "id": f"{rid}#{seen[rid]}"}
        else:
            seen[rid] = 1
        out.append(row)
    return out


def read_records(path: Path, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Records of a JSONL(.gz), JSON (a list, TriviaQA's {"Data": [...]}, or one object) or
    Parquet file. `columns` limits what is read from Parquet (others are never loaded)."""
    name = path.name
    if name.endswith(".parquet"):
        yield from _read_parquet(path, columns)
        return
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[: -len(".gz")] if name.endswith(".gz") else name
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TaskDataError(f"{path}:{n}: not a JSON line ({e})") from e
            return
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("Data"), list):
        yield from data["Data"]
    elif isinstance(data, list):
        yield from data
    elif isinstance(data, dict):
        yield data
    else:
        raise TaskDataError(f"{path}: expected a JSON list or object, got {type(data).__name__}")


def _read_parquet(path: Path, columns: Sequence[str] | None) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with tensorflow-datasets
        raise TaskDataError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow==26.0.1), "
            "or supply the JSONL files instead"
        ) from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    cols = None if columns is None else [c for c in columns if c in names]
    for batch in pf.iter_batches(batch_size=4096, columns=cols):
        yield from batch.to_pylist()


_RG_TEST_BUCKET, _RG_VALIDATION_BUCKET, _RG_BUCKETS = 0, 1, 10


def rg_split_of(task: str, question: str) -> str:
    """The split a reasoning-gym question belongs to: sha256(task, question) mod 10 is 0 for
    test, 1 for validation, anything else for train. A question's split depends on nothing
    else (not the seed, not the sizes), so splits never share a question, across seeds too."""
    bucket = int(stable_unit(task, question) * _RG_BUCKETS)
    if bucket == _RG_TEST_BUCKET:
        return "test"
    if bucket == _RG_VALIDATION_BUCKET:
        return "validation"
    return "train"


# ---------------------------------------------------------------------------------------------
# Config and the shared builder machinery.


@dataclasses.dataclass(eq=False)
class TaskBuilderConfig(tfds.core.BuilderConfig):
    """A builder config whose `options` (JSON types only) fully determine the data written."""

    options: dict = dataclasses.field(default_factory=dict)


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: one task family, configured by `options` (see `DEFAULTS` of each subclass).

    Each build lives under its `VERSION`. Bump a builder's VERSION (with a `RELEASE_NOTES` line)
    whenever what it writes can change, its helpers and the scorer code it calls included: TFDS then
    builds the new version beside the old instead of serving it. tests/test_versions.py pins each
    version to a digest of that code and fails on a change without a bump.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: id/task/question/answers/scorer/metadata."}
    TASK: str = ""
    SCORER: str = ""
    DEFAULTS: dict = {}
    CHOICES: Mapping[str, tuple] = {}  # option -> its allowed values
    COUNTS: tuple[str, ...] = ()  # options that must be ints >= 0
    ANSWER_FORMAT = None  # the family's `hrjax.tasks.answer_format.AnswerFormat`, if it declares one

    def __init__(self, *, config=None, file_format=None, **kwargs):
        if config is None:
            config = self.make_config()
        elif isinstance(config, Mapping):
            config = self.make_config(**config)
        super().__init__(config=config, file_format=file_format or "array_record", **kwargs)

    @property
    def options(self) -> dict:
        return self.builder_config.options

    @classmethod
    def make_config(cls, **options) -> TaskBuilderConfig:
        unknown = sorted(set(options) - set(cls.DEFAULTS))
        if unknown:
            raise TaskConfigError(
                f"{cls.TASK}: unknown option(s) {unknown}; this task takes "
                f"{sorted(cls.DEFAULTS)} (defaults {cls.DEFAULTS})"
            )
        opts = jsonable({**cls.DEFAULTS, **options})
        cls.validate_options(opts)
        canonical = json.dumps(opts, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
        return TaskBuilderConfig(
            name=f"{cls.config_slug(opts)}-{digest}",
            description=f"{cls.TASK} options: {canonical}",
            options=json.loads(canonical),
        )

    @classmethod
    def validate_options(cls, opts: dict) -> None:
        """The checks every builder shares, driven by its `CHOICES` (option -> allowed values) and
        `COUNTS` (options that must be ints >= 0); subclasses add their own after calling this."""
        for key, allowed in cls.CHOICES.items():
            if opts[key] not in allowed:
                raise TaskConfigError(f"{cls.TASK}: {key} must be one of {list(allowed)}, got {opts[key]!r}")
        for key in cls.COUNTS:
            if not isinstance(opts[key], int) or opts[key] < 0:
                raise TaskConfigError(f"{cls.TASK}: {key} must be an int >= 0, got {opts[key]!r}")
        for key in ("validation_fraction", "test_fraction"):
            if key in opts and not (0.0 <= float(opts[key]) < 1.0):
                raise TaskConfigError(f"{cls.TASK}: {key} must be in [0, 1), got {opts[key]}")
        if "seed" in opts and not isinstance(opts["seed"], int):
            raise TaskConfigError(f"{cls.TASK}: seed must be an int, got {opts['seed']!r}")

    @classmethod
    def config_slug(cls, opts: dict) -> str:
        return "s{}".format(opts.get("seed", 0))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS}),
            metadata=tfds.core.MetadataDict(task=self.TASK, options=self.options),
        )

    def _split_generators(self, dl_manager):
        splits = self.build_splits(dl_manager)
        out = {}
        for split, rows in splits.items():
            rows = unique_ids(rows)
            if rows:
                out[split] = self._generate_examples(rows)
            else:
                log.warning("%s: split %r has no usable examples; not built", self.TASK, split)
        if not out:
            raise TaskDataError(f"{self.TASK}: the data files held no usable examples")
        return out

    def _generate_examples(self, rows):
        for row in rows:
            yield row["id"], row

    def build_splits(self, dl_manager) -> dict[str, list[dict]]:
        raise NotImplementedError


class ManualTaskBuilder(TaskBuilder, skip_registration=True):
    """A task read from upstream files the user put in a manual dir.

    The files are looked for in `<manual_dir>/<DIRNAME>/` if that directory exists, else in
    `<manual_dir>/` itself. For each split, `file_patterns()` lists glob patterns in order of
    preference; the first one that matches any file wins (all its matches are read, in sorted
    order, e.g. every shard of a Parquet split). The key "all" names a file holding every split
    (e.g. `mbpp.jsonl`), used only when no per-split file was found.
    """

    DIRNAME: str = ""
    DOWNLOAD: str = ""  # where to get the files, for error messages
    COLUMNS: tuple[str, ...] | None = None  # Parquet columns to read (None: all)

    @classmethod
    def file_patterns(cls, opts: dict) -> dict[str, list[str]]:
        return standard_patterns()

    @classmethod
    def expected_files(cls, opts: dict | None = None) -> str:
        opts = cls.make_config().options if opts is None else opts
        lines = [f"  {split}: " + " | ".join(p) for split, p in cls.file_patterns(opts).items()]
        return "\n".join(lines)

    @classmethod
    def missing_message(cls, where: str, opts: dict | None = None) -> str:
        return (
            f"{cls.TASK}: {where}.\nExpected files (glob patterns, first match per split wins), "
            f"in <manual_dir>/{cls.DIRNAME}/ or directly in <manual_dir>/:\n"
            f"{cls.expected_files(opts)}\nDownload them from: {cls.DOWNLOAD}\n"
            f"then pass manual_dir=<that directory> (load_task(..., manual_dir=...), or "
            f"tfds.download.DownloadConfig(manual_dir=...))."
        )

    @classmethod
    def find_files(cls, manual_dir: Path, opts: dict) -> tuple[Path, dict[str, list[Path]]]:
        """(root searched, split -> files); raises TaskDataError if nothing matched."""
        manual_dir = Path(manual_dir).expanduser()
        if not manual_dir.is_dir():
            raise TaskDataError(cls.missing_message(f"manual dir {manual_dir} does not exist", opts))
        root = manual_dir / cls.DIRNAME if (manual_dir / cls.DIRNAME).is_dir() else manual_dir
        found = {}
        for split, patterns in cls.file_patterns(opts).items():
            for pattern in patterns:
                files = sorted(p for p in root.glob(pattern) if p.is_file())
                if files:
                    found[split] = files
                    break
        if "all" in found and any(s in found for s in SPLITS):
            del found["all"]
        if not found:
            raise TaskDataError(cls.missing_message(f"no data files found in {root}", opts))
        return root, found

    def source_files(self, dl_manager) -> dict[str, list[Path]]:
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as e:  # TFDS: manual dir not given, missing, or empty
            why = str(e).strip().splitlines()[0] if str(e).strip() else "manual dir missing"
            raise TaskDataError(self.missing_message(f"no usable manual dir ({why})", self.options)) from None
        root, found = self.find_files(Path(manual_dir), self.options)
        log.info("%s: reading %s", self.TASK,
                 {s: [str(f.relative_to(root)) for f in fs] for s, fs in found.items()})
        return found

    def records(self, files: Sequence[Path]) -> Iterator[tuple[dict, Path]]:
        for path in files:
            for rec in read_records(path, self.COLUMNS):
                yield rec, path

    def parse(self, rec: dict, split: str, index: int, path: Path) -> dict | None:
        """One upstream record -> an example (`make_example`), or None to drop it."""
        raise NotImplementedError

    def parse_split(self, split: str, files: Sequence[Path]) -> list[dict]:
        rows, dropped = [], 0
        for index, (rec, path) in enumerate(self.records(files)):
            try:
                row = self.parse(rec, split, index, path)
            except (KeyError, TypeError, AttributeError) as e:
                raise TaskDataError(
                    f"{self.TASK}: {path}: record {index} is not in the expected upstream format "
                    f"({type(e).__name__}: {e}); fields present: "
                    f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}"
                ) from e
            if row is None:
                dropped += 1
            else:
                rows.append(row)
        if dropped:
            log.warning("%s/%s: dropped %d record(s) without a gold answer", self.TASK, split, dropped)
        return rows

    def build_splits(self, dl_manager) -> dict[str, list[dict]]:
        found = self.source_files(dl_manager)
        splits = {s: self.parse_split(s, fs) for s, fs in found.items() if s in SPLITS}
        return self.finish_splits(splits)

    def finish_splits(self, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Carves validation out of train when upstream has train but no validation split."""
        if "train" in splits and "validation" not in splits:
            frac = float(self.options.get("validation_fraction", 0.0))
            if frac > 0:
                splits["train"], splits["validation"] = carve(
                    splits["train"], frac, int(self.options.get("seed", 0))
                )
        return {s: splits[s] for s in SPLITS if s in splits}


def standard_patterns(
    subdirs: Sequence[str] = (), extra: Mapping[str, Sequence[str]] | None = None,
    splits: Sequence[str] = SPLITS,
) -> dict[str, list[str]]:
    """Per split: the family's own names (`extra`), then `<split>.jsonl[.gz]`, `<split>.json`,
    `<split>.parquet`, `<split>-*.parquet` (HF shards), also under each HF config dir in `subdirs`."""
    out: dict[str, list[str]] = {}
    for split in splits:
        pats = list((extra or {}).get(split, ()))
        for sub in subdirs:
            for a in _SPLIT_ALIASES[split]:
                pats += [f"{sub}/{a}-*.parquet", f"{sub}/{a}.parquet", f"{sub}/{a}.jsonl"]
        for a in _SPLIT_ALIASES[split]:
            pats += [f"{a}.jsonl", f"{a}.jsonl.gz", f"{a}.json", f"{a}.parquet", f"{a}-*.parquet"]
        out[split] = pats
    for key, pats in (extra or {}).items():
        if key not in out:
            out[key] = list(pats)
    return out
