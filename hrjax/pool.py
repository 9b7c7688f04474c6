"""The model pool: per model a checkpoint, tokenizer, prompt format and cost rate, loaded once.

Models whose vocabularies are identical share a `tokenizer_id`: the env then hands one model's
answer to the next as the answer's own token ids instead of re-tokenising its text.

A model's `fingerprint` keys its cached answers, so it identifies what the answers depend on, not
the checkpoint's name: the files' content (a hub checkpoint's resolved commit; else the sha256 of the
GGUF file or of the directory's files), the config, the dtype, and the tokenizer as it behaves (its
full serialisation, chat template and special tokens, however it was given). File digests are
memoised by (size, mtime, ctime, inode) in `FileDigests`' index, so only a new or changed file is read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from hrjax.errors import HrjaxError
from hrjax.fsutil import atomic_file
from hrjax.generate.sampler import Sampler

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from hrjax.config import RunConfig

CHECKPOINT_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt")  # what the HF loaders read
_HUB_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One pool member. `checkpoint`: a HF directory, a hub id or a `.gguf` file."""

    name: str
    checkpoint: str
    base_rate: float  # cost units per token, tokens in + tokens out
    tokenizer: Optional[str] = None  # a HF tokenizer directory (for a GGUF without a usable vocabulary)
    use_chat_template: bool = True  # wrap each hop prompt in the tokenizer's chat template, if it has one
    prompt_template: str = "{message}"  # applied to the hop message first, e.g. for base models
    dtype: str = "float32"

    def __post_init__(self):
        if self.base_rate < 0:
            raise ValueError(f"Model '{self.name}': base_rate must be >= 0, got {self.base_rate}.")
        if "{message}" not in self.prompt_template:
            raise ValueError(f"Model '{self.name}': prompt_template must contain '{{message}}', got "
                             f"{self.prompt_template!r}.")


@dataclasses.dataclass
class PoolModel:
    spec: ModelSpec
    sampler: Sampler
    fingerprint: str  # identifies the weights and config in cache keys
    tokenizer_id: str  # equal for models whose tokenizers map text to the same ids

    @property
    def tokenizer(self):
        return self.sampler.tokenizer

    def render(self, message: str) -> tuple[str, bool]:
        """A user message -> (prompt text, whether the tokenizer must add its special tokens): the
        chat template with a generation prompt when used (it writes its own specials)."""
        tok = self.tokenizer
        message = self.spec.prompt_template.replace("{message}", message)
        if self.spec.use_chat_template and getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                           tokenize=False), False
        return message, True

    def encode_prompt(self, message: str) -> list[int]:
        """A user message -> prompt token ids."""
        text, add_special_tokens = self.render(message)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    @functools.cached_property
    def special_affixes(self) -> tuple[list[int], list[int]]:
        """The special token ids the tokenizer puts before and after a text (e.g. [CLS] / [SEP])."""
        full = self.tokenizer.encode("x")
        bare = self.tokenizer.encode("x", add_special_tokens=False)
        at = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
        return full[:at], full[at + len(bare):]

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)


class FileDigests:
    """sha256 of files' contents, memoised in a JSON index (None: for this process only) under the
    file's real path and its (size, mtime_ns, ctime_ns, inode): a file rewritten in place or replaced
    is read again. Call `save` to keep what was computed."""

    def __init__(self, index: Optional[str | os.PathLike] = None):
        self.index = None if index is None else Path(index).expanduser()
        self.known: dict[str, list] = {}
        if self.index is not None and self.index.exists():
            try:
                self.known = json.loads(self.index.read_text())
            except (OSError, ValueError):
                self.known = {}  # a damaged index only costs hashing again
        self.changed = False

    def digest(self, path: str | os.PathLike) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        known = self.known.get(real)
        if known is not None and known[:4] == stamp:
            return known[4]
        with open(real, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.known[real], self.changed = stamp + [digest], True
        return digest

    def save(self) -> None:
        if self.index is not None and self.changed:
            with atomic_file(self.index, "w") as f:
                json.dump(self.known, f)
            self.changed = False


def checkpoint_fingerprint(source: str | os.PathLike, digests: FileDigests) -> str:
    """What identifies a checkpoint's (or a tokenizer's) files: `hub:<repo>@<commit>` for a hub snapshot
    directory (immutable per commit), the content digest of a file (GGUF) or of a directory's
    `CHECKPOINT_FILES`; `id:<source>` for a hub id that names no local path."""
    path = Path(source)
    if path.is_file():
        return f"sha256:{digests.digest(path)}"
    if path.parent.name == "snapshots" and _HUB_SNAPSHOT.fullmatch(path.name):
        return f"hub:{path.parent.parent.name}@{path.name}"
    if path.is_dir():
        files = sorted({f for pattern in CHECKPOINT_FILES for f in path.glob(pattern) if f.is_file()})
        listing = [[f.name, digests.digest(f)] for f in files]
        return "sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return f"id:{source}"


def spec_fingerprint(spec: ModelSpec, digests: FileDigests) -> dict:
    """The content of a spec's files without loading the model: its checkpoint (a hub id resolved as
    `load_hf` resolves it) and its tokenizer override."""
    checkpoint = spec.checkpoint
    if not Path(checkpoint).exists() and not checkpoint.startswith((".", "/")) and checkpoint.count("/") == 1:
        from hrjax.models.hf import resolve_hub

        checkpoint = resolve_hub(checkpoint)
    return {"checkpoint": checkpoint_fingerprint(checkpoint, digests),
            "tokenizer": None if spec.tokenizer is None else checkpoint_fingerprint(spec.tokenizer, digests)}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of how a tokenizer behaves: its full serialisation (fast tokenizers: normaliser,
    pre-tokeniser, model, added tokens, post-processor; else its vocabulary), chat template and
    special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.special_tokens_map]
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def load_model(spec: ModelSpec, digests: Optional[FileDigests] = None, mesh: Optional["Mesh"] = None) -> PoolModel:
    """Loads one pool member through the HF or GGUF loader; `digests` memoises file digests. `mesh`: its
    sampler runs tensor-parallel over the mesh's `model` axis (`hrjax.models.sharding`), prompts over `data`."""
    from hrjax.models.gguf import load_gguf
    from hrjax.models.hf import load_hf

    if spec.checkpoint.endswith(".gguf"):
        lm = load_gguf(spec.checkpoint, dtype=spec.dtype, tokenizer=spec.tokenizer, mesh=mesh)
    else:
        lm = load_hf(spec.checkpoint, dtype=spec.dtype, mesh=mesh)
        if spec.tokenizer is not None:
            from transformers import AutoTokenizer
            lm.tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    if lm.tokenizer is None:
        raise HrjaxError(f"Model '{spec.name}' ({spec.checkpoint}) has no tokenizer: set `tokenizer` to a "
                         "HF tokenizer directory in its ModelSpec.")
    identity = {"weights": checkpoint_fingerprint(lm.source, digests or FileDigests()), "config": lm.hf_config,
                "dtype": spec.dtype, "tokenizer": tokenizer_fingerprint(lm.tokenizer),
                "use_chat_template": spec.use_chat_template}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    vocabulary = sorted(lm.tokenizer.get_vocab().items())
    tokenizer_id = hashlib.sha256(json.dumps(vocabulary).encode()).hexdigest()[:16]
    return PoolModel(spec, Sampler.from_loaded(lm, mesh=mesh), fingerprint, tokenizer_id)


class Pool:
    """The M models a router chooses between, in action order."""

    def __init__(self, models: Sequence[PoolModel]):
        names = [m.spec.name for m in models]
        if not models:
            raise ValueError("A pool needs at least one model.")
        if len(set(names)) != len(names):
            raise ValueError(f"Pool model names must be unique, got {names}.")
        self.models = list(models)

    @classmethod
    def from_specs(cls, specs: Sequence[ModelSpec], digest_index: Optional[str | os.PathLike] = None,
                   mesh: Optional["Mesh"] = None) -> "Pool":
        """Loads every spec; `digest_index`: a file memoising weight-file digests across runs (see `FileDigests`);
        `mesh`: every model sharded over it (see `load_model`)."""
        digests = FileDigests(digest_index)
        pool = cls([load_model(s, digests, mesh) for s in specs])
        digests.save()
        return pool

    def __len__(self) -> int:
        return len(self.models)

    @property
    def base_rates(self) -> list[float]:
        return [m.spec.base_rate for m in self.models]


def resolve_pool(config: "RunConfig", progress: bool = True) -> "RunConfig":
    """`config` with its pool spelled out, the one place every entry point (train, evaluate, export,
    the launchers) turns a config into pool members: a `specialists` recipe is built (or reused from
    `<train.cache_dir>/specialists`) and its members become the pool; explicit members are kept."""
    if not config.specialists:
        return config
    from hrjax.config import ConfigError
    from hrjax.specialists.build import RECIPES, build_pool

    if config.specialists not in RECIPES:
        raise ConfigError(f"config.specialists '{config.specialists}' is not a recipe; known: {sorted(RECIPES)}.")
    if config.pool:
        raise ConfigError("config.pool and config.specialists are both set: keep one (the recipe builds the pool).")
    specs = build_pool(RECIPES[config.specialists], Path(config.train.cache_dir).expanduser() / "specialists",
                       progress=progress, processes=config.train.local_processes)
    return dataclasses.replace(config, pool=tuple(specs), specialists="")


def digest_index(config: "RunConfig") -> Path:
    """The memo of weight-file digests, shared by every run on the cache dir (see `FileDigests`)."""
    return Path(config.train.cache_dir).expanduser() / "file_digests.json"


def load_pool(config: "RunConfig") -> Pool:
    """The pool of a resolved `config` (`resolve_pool`) as this process runs it: every model on this
    process's devices, tensor-parallel over `config.mesh.model` when that is above 1
    (`hrjax.parallel.sampler_mesh`); file digests memoised under the cache dir."""
    from hrjax.parallel import sampler_mesh

    if config.specialists:
        raise HrjaxError("load_pool needs a resolved config: call hrjax.pool.resolve_pool(config) first.")
    return Pool.from_specs(config.pool, digest_index=digest_index(config), mesh=sampler_mesh(config.mesh))
