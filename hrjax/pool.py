"""The model pool: per model a checkpoint, tokenizer, prompt format and cost rate, loaded once."""

from __future__ import annotations

import dataclasses
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
    dtype: str = "float32"

    def __post_init__(self):
        if self.base_rate < 0:
            raise ValueError(f"Model '{self.name}': base_rate must be >= 0, got {self.base_rate}.")


@dataclasses.dataclass
class PoolModel:
    spec: ModelSpec
    sampler: Sampler
    fingerprint: str  # identifies the weights and config in cache keys

    @property
    def tokenizer(self):
        return self.sampler.tokenizer

    def encode_prompt(self, message: str) -> list[int]:
        """A user message -> prompt token ids (chat template with generation prompt when used)."""
        tok = self.tokenizer
        if self.spec.use_chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                           tokenize=False)
            return tok.encode(text, add_special_tokens=False)
        return tok.encode(message)


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
    return PoolModel(spec, Sampler.from_loaded(lm), fingerprint)


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
