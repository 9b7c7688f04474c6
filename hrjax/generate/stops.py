"""Stop strings matched on the generated text while it is decoded, on device.

A row ends once the decoded text of its generated tokens holds one of its stop strings, the text
`Sampler.with_text` cuts afterwards, also where the stop is not the tokenizer's own tokenization of it
('\\n' inside a '.\\n' token, '5 6' across the ids 15, 6). Two tables make that a few gathers a step:
- `TokenBytes`, one per tokenizer: the UTF-8 bytes each token adds to a decoded text, as the first
  token of the text and after others (a SentencePiece '▁the' adds 'the' first and ' the' later).
- A stop automaton per request (`stop_automaton`): the Aho-Corasick automaton of its stop strings'
  bytes as a full transition table [Q, 256] and its accepting states [Q].
`advance` feeds each row's new token's bytes through its row's automaton. A token whose bytes are
not whole characters (a byte-fallback piece of a longer character) feeds a byte no stop holds, so a
stop through it is found only in the text afterwards, as is any stop of a tokenizer whose decoded text
is not the concatenation of its tokens' pieces (`token_bytes` then gives None): rows never end early on
text they would not hold.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hrjax.shapes import pow2_bucket

UNKNOWN_BYTE = 0xFF  # never in UTF-8 text: a piece that is not whole characters resets the automaton
MIN_STATES = 16  # automata of up to 15 stop bytes share one shape (and program)


class TokenBytes(NamedTuple):
    """The bytes each of V tokens adds to a decoded text, padded to W: as the text's first token (`first`)
    and after other tokens (`rest`); special tokens add none (decoding skips them)."""

    first: jax.Array  # [V, W] uint8
    first_length: jax.Array  # [V] int32
    rest: jax.Array  # [V, W] uint8
    rest_length: jax.Array  # [V] int32


def _decode_all(tokenizer, sequences: list[list[int]]) -> list[str]:
    batch_decode = getattr(tokenizer, "batch_decode", None)
    if batch_decode is not None:
        return batch_decode(sequences, skip_special_tokens=True)
    return [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]


def _pieces_table(pieces: list[bytes], width: int) -> tuple[jax.Array, jax.Array]:
    """-> (pieces [V, width] uint8 zero-padded, lengths [V] int32)."""
    table = np.zeros((len(pieces), width), np.uint8)
    lengths = np.zeros((len(pieces),), np.int32)
    for v, piece in enumerate(pieces):
        table[v, :len(piece)] = np.frombuffer(piece, np.uint8)
        lengths[v] = len(piece)
    return jnp.asarray(table), jnp.asarray(lengths)


def token_bytes(tokenizer, vocab_size: int, checks: int = 8, check_length: int = 48) -> Optional[TokenBytes]:
    """The `TokenBytes` of `tokenizer`'s first `vocab_size` ids, read from its own decoder: a token alone
    decodes to its first piece, twice to its first piece then its later one. None (with a warning) when
    `checks` random sequences of `check_length` whole-character tokens do not decode to their pieces
    joined (a decoder that edits across tokens, e.g. `clean_up_tokenization_spaces`): stops are then
    matched only on the text afterwards."""
    alone = _decode_all(tokenizer, [[v] for v in range(vocab_size)])
    twice = _decode_all(tokenizer, [[v, v] for v in range(vocab_size)])
    first, rest, whole = [], [], []
    for v, (one, two) in enumerate(zip(alone, twice)):
        later = two[len(one):] if two.startswith(one) else "\ufffd"
        clean = "\ufffd" not in one + later
        first.append(one.encode() if clean else bytes([UNKNOWN_BYTE]))
        rest.append(later.encode() if clean else bytes([UNKNOWN_BYTE]))
        if clean and one:
            whole.append(v)
    rng = np.random.RandomState(0)
    sequences = [rng.choice(whole, check_length).tolist() for _ in range(checks if whole else 0)]
    for sequence, text in zip(sequences, _decode_all(tokenizer, sequences)):
        if text.encode() != first[sequence[0]] + b"".join(rest[v] for v in sequence[1:]):
            logging.warning("%s's decoded text is not its tokens' pieces joined (e.g. %r): stop strings are "
                            "found in the text after generation, not while generating.", type(tokenizer).__name__,
                            text[:60])
            return None
    width = max(1, *(len(p) for p in first + rest))
    return TokenBytes(*_pieces_table(first, width), *_pieces_table(rest, width))


def no_token_bytes() -> TokenBytes:
    """The table of a sampler without a tokenizer (it takes no stop strings): one empty piece."""
    empty, length = jnp.zeros((1, 1), jnp.uint8), jnp.zeros((1,), jnp.int32)
    return TokenBytes(empty, length, empty, length)


def automaton_states(stops: Sequence[str]) -> int:
    """Q, the states of `stop_automaton(stops)` bucketed: a power of two >= `MIN_STATES`."""
    prefixes = {s.encode()[:i] for s in stops for i in range(1, len(s.encode()) + 1)}
    return pow2_bucket(len(prefixes) + 1, MIN_STATES)


@functools.lru_cache(maxsize=256)
def _automaton(stops: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    goto: list[dict[int, int]] = [{}]
    accepting = [False]
    for stop in stops:
        node = 0
        for byte in stop.encode():
            if byte not in goto[node]:
                goto.append({})
                accepting.append(False)
                goto[node][byte] = len(goto) - 1
            node = goto[node][byte]
        accepting[node] = bool(stop)
    transitions = np.zeros((len(goto), 256), np.int32)
    fail = [0] * len(goto)
    order = list(goto[0].values())  # breadth first: a node's failure state is settled before its children
    transitions[0, list(goto[0])] = order
    for node in order:
        accepting[node] = accepting[node] or accepting[fail[node]]
        transitions[node] = transitions[fail[node]]
        for byte, child in goto[node].items():
            fail[child] = transitions[fail[node], byte]
            transitions[node, byte] = child
            order.append(child)
    transitions.flags.writeable = False
    accepting = np.array(accepting)
    accepting.flags.writeable = False
    return transitions, accepting


def stop_automaton(stops: Sequence[str], states: int) -> tuple[np.ndarray, np.ndarray]:
    """The Aho-Corasick automaton over the UTF-8 bytes of `stops`, padded to `states` (>=
    `automaton_states(stops)`) -> (transitions [Q, 256] int32, accepting [Q] bool). State 0 is the
    start; a state accepts when the bytes fed so far end with a stop; padding states are never reached."""
    transitions, accepting = _automaton(tuple(s for s in stops if s))
    if states < transitions.shape[0]:
        raise ValueError(f"{len(stops)} stop strings need {transitions.shape[0]} automaton states, not {states}.")
    pad = states - transitions.shape[0]
    return np.pad(transitions, ((0, pad), (0, 0))), np.pad(accepting, (0, pad))


def advance(tokens, state, started, active, table: TokenBytes, transitions, accepting):
    """Feeds each row's new token to its stop automaton.

    Args:
      tokens: [R] int32 each row's new token; active: [R] bool, the rows that made one.
      state: [R] int32 each row's automaton state; started: [R] bool, its text has begun (the token adds
        its `rest` piece, else its `first`).
      table: the tokenizer's `TokenBytes`; transitions: [R, Q, 256] int32; accepting: [R, Q] bool.
    Returns (state, started, hit [R] bool: the row's text now holds one of its stops). Rows without a
    stop string feed nothing (a step costs nothing when no row has one).
    """
    tokens = jnp.maximum(tokens, 0)
    piece = jnp.where(started[:, None], table.rest[tokens], table.first[tokens])  # [R, W]
    length = jnp.where(started, table.rest_length[tokens], table.first_length[tokens]) * active
    started = started | (length > 0)
    length = jnp.where(jnp.any(accepting, axis=1), length, 0)
    rows = jnp.arange(tokens.shape[0])

    def feed(carry):
        i, state, hit = carry
        byte = jax.lax.dynamic_index_in_dim(piece, i, axis=1, keepdims=False).astype(jnp.int32)
        following = transitions[rows, state, byte]
        fed = i < length
        return i + 1, jnp.where(fed, following, state), hit | (fed & accepting[rows, following])

    _, state, hit = jax.lax.while_loop(lambda carry: carry[0] < jnp.max(length), feed,
                                       (jnp.int32(0), state, jnp.zeros(tokens.shape, bool)))
    return state, started, hit
