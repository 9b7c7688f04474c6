"""How a sentence encoder's inputs are batched, shared by the Flax encoder (`hrjax.models.encoder`) and
the exported one a serving bundle runs (`hrjax.serving.router`); no Flax here, so serving can import it.

Texts are tokenised as sentence-transformers does (stripped, lower-cased when the model is, truncated),
then packed without padding between them: several texts share a row of the encoder's input, each a
segment (segment ids 1, 2, ... in that row, 0 for the row's padding) that attends only to itself, with
positions restarting at 0 and one mean-pooled output slot per segment. Longest texts first, each into the
first row with room (first-fit decreasing). A call's rows are padded to one of a few [B, R] shapes
(`packed_shapes`), so a stream of varied inputs compiles the encoder only a few times:

- everything fits one row of `max_seq_length` tokens: [1, R], R the row's tokens rounded up to the
  `fine_bucket` ladder 8, 12, 16, 24, 32, 48, ... (a batch of short contexts costs its own tokens, not
  rows x its longest text);
- else rows of `SHORT_ROW` tokens when every text of the call fits one (less attention over keys of
  other segments), or of `max_seq_length`, up to `batch_size` rows a call, B a power of two (the
  finer ladder saved padding but compiled more programs than it saved time in a path tree's build).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from hrjax.shapes import fine_bucket, pow2_bucket

MIN_ROW_TOKENS = 8
SHORT_ROW = 64  # row length of a many-row call whose texts are all this short or shorter


def tokenize(tokenizer, texts: Sequence[str], do_lower_case: bool, max_seq_length: int) -> list[list[int]]:
    """Token ids per text ([CLS] ... [SEP]), truncated to `max_seq_length`, as sentence-transformers."""
    texts = [str(t).strip() for t in texts]
    if do_lower_case:
        texts = [t.lower() for t in texts]
    return tokenizer(texts, truncation=True, max_length=max_seq_length)["input_ids"]


def _row_tokens(n: int) -> int:
    return fine_bucket(n, MIN_ROW_TOKENS, steps_per_octave=2)


def max_segments(row_tokens: int) -> int:
    """Output slots of a row of `row_tokens` tokens (the packer puts at most this many texts in it; a text
    has at least 2 tokens, [CLS] and [SEP], when the tokenizer adds them)."""
    return (row_tokens + 1) // 2


def packed_shapes(batch_size: int, max_seq_length: int) -> list[tuple[int, int]]:
    """Every [B, R] `pack` can give (what a server compiles before its first request)."""
    single = sorted({min(_row_tokens(t), max_seq_length) for t in range(1, max_seq_length + 1)})
    rows = sorted({min(pow2_bucket(b), batch_size) for b in range(2, batch_size + 1)})
    lengths = sorted({min(SHORT_ROW, max_seq_length), max_seq_length})
    return [(1, r) for r in single] + [(b, r) for r in lengths for b in rows]


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One encoder call: input_ids and segment_ids [B, R] int32 (segment k >= 1 is the row's k-th text,
    0 padding); text j of the input is at (row[j], slot[j]) of the call's [B, max_segments(R), dim] output."""

    input_ids: np.ndarray
    segment_ids: np.ndarray
    texts: np.ndarray  # [n] indices into the packed `ids`
    row: np.ndarray  # [n]
    slot: np.ndarray  # [n]


def pack(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, max_seq_length: int) -> list[PackedBatch]:
    """Token ids per text (each at most `max_seq_length` long) -> the encoder calls that embed them all."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 row, got {batch_size}.")
    lengths = [len(t) for t in ids]
    if lengths and (max(lengths) > max_seq_length or min(lengths) < 1):
        raise ValueError(f"Texts must have 1 to max_seq_length={max_seq_length} tokens; got {min(lengths)} to "
                         f"{max(lengths)}: tokenize them with truncation (`tokenize`).")
    order = sorted(range(len(ids)), key=lambda j: -lengths[j])
    calls = []
    while order:
        if sum(lengths[j] for j in order) <= max_seq_length and len(order) <= max_segments(max_seq_length):
            capacity, rows_allowed = max_seq_length, 1
        else:
            capacity = min(SHORT_ROW, max_seq_length) if lengths[order[0]] <= SHORT_ROW else max_seq_length
            rows_allowed = batch_size
        free, count, placed = [], [], []  # per row: tokens left, texts in it; per text: (j, row, slot)
        room, shortest, most = capacity, lengths[order[-1]], max_segments(capacity)  # room: the most a row takes
        for j in order:
            if lengths[j] > room:
                continue  # the next call takes it
            row = next((r for r, left in enumerate(free) if left >= lengths[j] and count[r] < most), None)
            if row is None:
                free.append(capacity)
                count.append(0)
                row = len(free) - 1
            placed.append((j, row, count[row]))
            free[row] -= lengths[j]
            count[row] += 1
            if len(free) == rows_allowed:
                room = max((left for left, n in zip(free, count) if n < most), default=0)
                if room < shortest:
                    break
        if rows_allowed == 1:
            shape = (1, min(_row_tokens(capacity - free[0]), max_seq_length))
        else:
            shape = (min(pow2_bucket(len(free)), batch_size), capacity)
        calls.append(_fill(ids, placed, shape, pad_id))
        taken = {j for j, _, _ in placed}
        order = [j for j in order if j not in taken]
    return calls


def _fill(ids, placed: list[tuple[int, int, int]], shape: tuple[int, int], pad_id: int) -> PackedBatch:
    input_ids = np.full(shape, pad_id, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    used = np.zeros(shape[0], np.int64)
    for j, row, slot in placed:
        n = len(ids[j])
        input_ids[row, used[row]:used[row] + n] = ids[j]
        segment_ids[row, used[row]:used[row] + n] = slot + 1
        used[row] += n
    texts, rows, slots = (np.array(column, np.int64) for column in zip(*placed))
    return PackedBatch(input_ids, segment_ids, texts, rows, slots)


def embed_packed(ids: Sequence[Sequence[int]], embed: Callable[[np.ndarray, np.ndarray], np.ndarray], dim: int,
                 batch_size: int, pad_id: int, max_seq_length: int) -> np.ndarray:
    """Token ids per text -> [N, dim] float32 embeddings in input order; `embed(input_ids [B, R] int32,
    segment_ids [B, R] int32) -> [B, max_segments(R), dim]` runs once per packed call."""
    out = np.zeros((len(ids), dim), np.float32)
    for call in pack(ids, batch_size, pad_id, max_seq_length):
        out[call.texts] = np.asarray(embed(call.input_ids, call.segment_ids))[call.row, call.slot]
    return out
