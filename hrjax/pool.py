"""The model pool: per model a checkpoint, tokenizer, prompt format and cost rate, loaded once.

Models whose vocabularies are identical share a `tokenizer_id`: the env then hands one model's
answer to the next as the answer's own token ids instead of re-tokenising its text.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Optional, Sequence

from hrjax.errors import HrjaxError
from hrjax.generate.sampler import Sampler


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


def load_model(spec: ModelSpec) -> PoolModel:
    """Loads one pool member through the HF or GGUF loader."""
    from hrjax.models.gguf import load_gguf
    from hrjax.models.hf import load_hf

    if spec.checkpoint.endswith(".gguf"):
        lm = load_gguf(spec.checkpoint, dtype=spec.dtype, tokenizer=spec.tokenizer)
    else:
        lm = load_hf(spec.checkpoint, dtype=spec.dtype)
        if spec.tokenizer is not None:
            from transformers import AutoTokenizer
            lm.tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    if lm.tokenizer is None:
        raise HrjaxError(f"Model '{spec.name}' ({spec.checkpoint}) has no tokenizer: set `tokenizer` to a "
                         "HF tokenizer directory in its ModelSpec.")
    fingerprint = hashlib.sha256(json.dumps(
        [spec.name, spec.checkpoint, spec.dtype, spec.use_chat_template, lm.hf_config], sort_keys=True,
        default=str).encode()).hexdigest()[:16]
    vocabulary = sorted(lm.tokenizer.get_vocab().items())
    tokenizer_id = hashlib.sha256(json.dumps(vocabulary).encode()).hexdigest()[:16]
    return PoolModel(spec, Sampler.from_loaded(lm), fingerprint, tokenizer_id)


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
    def from_specs(cls, specs: Sequence[ModelSpec]) -> "Pool":
        return cls([load_model(s) for s in specs])

    def __len__(self) -> int:
        return len(self.models)

    @property
    def base_rates(self) -> list[float]:
        return [m.spec.base_rate for m in self.models]
