"""How a sentence encoder's inputs are batched, shared by the Flax encoder (`hrjax.models.encoder`) and
the exported one a serving bundle runs (`hrjax.serving.router`); no Flax here, so serving can import it.

Texts are tokenised as sentence-transformers does (stripped, lower-cased when the model is, truncated),
sorted by length so similar lengths share a batch, and each batch padded to a (power-of-two rows,
power-of-two length) bucket so a stream of varied inputs compiles the embedding only a few times.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hrjax.shapes import pow2_bucket

MIN_SEQ_BUCKET = 8


def tokenize(tokenizer, texts: Sequence[str], do_lower_case: bool, max_seq_length: int) -> list[list[int]]:
    """Token ids per text ([CLS] ... [SEP]), truncated to `max_seq_length`, as sentence-transformers."""
    texts = [str(t).strip() for t in texts]
    if do_lower_case:
        texts = [t.lower() for t in texts]
    return tokenizer(texts, truncation=True, max_length=max_seq_length)["input_ids"]


def bucket_shape(batch: int, length: int, batch_size: int, max_seq_length: int) -> tuple[int, int]:
    """The padded [B, T] a batch of `batch` rows up to `length` tokens runs at."""
    return min(pow2_bucket(batch), pow2_bucket(batch_size)), min(pow2_bucket(length, MIN_SEQ_BUCKET), max_seq_length)


def bucket_shapes(batch_size: int, max_seq_length: int) -> list[tuple[int, int]]:
    """Every padded [B, T] `embed_in_buckets` can run at (what a server compiles before its first request)."""
    rows = sorted({bucket_shape(b, MIN_SEQ_BUCKET, batch_size, max_seq_length)[0] for b in range(1, batch_size + 1)})
    lengths = sorted({bucket_shape(1, t, batch_size, max_seq_length)[1] for t in range(1, max_seq_length + 1)})
    return [(b, t) for t in lengths for b in rows]


def embed_in_buckets(ids: Sequence[Sequence[int]], embed: Callable[[np.ndarray, np.ndarray], np.ndarray], dim: int,
                     batch_size: int, pad_id: int, max_seq_length: int) -> np.ndarray:
    """Token ids per text -> [N, dim] float32 embeddings in input order; `embed(input_ids [B, T] int32,
    attention_mask [B, T] int32) -> [B, dim]` runs once per padded batch."""
    out = np.zeros((len(ids), dim), np.float32)
    order = sorted(range(len(ids)), key=lambda j: -len(ids[j]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        b, t = bucket_shape(len(rows), max(len(ids[j]) for j in rows), batch_size, max_seq_length)
        input_ids = np.full((b, t), pad_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        for r, j in enumerate(rows):
            input_ids[r, :len(ids[j])] = ids[j]
            mask[r, :len(ids[j])] = 1
        out[rows] = np.asarray(embed(input_ids, mask))[:len(rows)]
    return out
