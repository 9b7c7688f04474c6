"""Stop strings on the generated text while decoding: the byte automaton and the tokenizers' piece tables."""

import numpy as np
import pytest

from hrjax.generate.stops import automaton_states, stop_automaton, token_bytes

STOP_SETS = [("\n",), ("aa", "aab", "ba"), ("abcd", "bc"), ("é\n", "b"), ("abcab", "cab", "bca"), ("Question:", "\n\n"), ()]


@pytest.mark.parametrize("stops", STOP_SETS)
def test_the_stop_automaton_accepts_where_the_bytes_end_with_a_stop(stops):
    transitions, accepting = stop_automaton(stops, automaton_states(stops))
    assert transitions.shape == (automaton_states(stops), 256) and automaton_states(stops) >= 16
    alphabet = list("abc\né Q:uestion")
    rng = np.random.RandomState(len(stops))
    for _ in range(40):
        text = "".join(rng.choice(alphabet, rng.randint(1, 30))).encode()
        state = 0
        for end in range(1, len(text) + 1):
            state = transitions[state, text[end - 1]]
            assert accepting[state] == any(text[:end].endswith(s.encode()) for s in stops), (stops, text[:end])


def test_too_few_automaton_states_are_refused():
    with pytest.raises(ValueError, match="automaton states"):
        stop_automaton(("abcdefghijklmnopqrstuvwxyz",), 16)


class SpaceJoinedIds:
    """Decodes ids as space-separated numbers and id 0 as nothing (a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if i)


class CleansSpaces(SpaceJoinedIds):
    """Edits across tokens, as `clean_up_tokenization_spaces` does: '9 1' reads '91'."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode(ids).replace("9 1", "91")


def test_pieces_of_a_tokenizer_that_joins_with_spaces():
    table = token_bytes(SpaceJoinedIds(), 300)
    first = lambda v: bytes(table.first[v][:table.first_length[v]])  # noqa: E731
    rest = lambda v: bytes(table.rest[v][:table.rest_length[v]])  # noqa: E731
    assert (first(15), rest(15), first(0), rest(0)) == (b"15", b" 15", b"", b"")


def test_a_tokenizer_whose_text_is_not_its_pieces_joined_gets_no_table(caplog):
    assert token_bytes(CleansSpaces(), 300) is None
    assert "not its tokens' pieces joined" in caplog.text


def test_real_tokenizers_decode_to_their_pieces_joined():
    """SmolLM2's byte-level BPE and MiniLM's WordPiece: random token sequences (bytes of partial characters
    included) decode to their pieces joined, where no piece is a partial character."""
    from transformers import AutoTokenizer

    from hrjax import assets
    from hrjax.errors import CheckpointError

    tokenizers = {"minilm": AutoTokenizer.from_pretrained(str(assets.minilm_path()))}
    try:
        path = assets.smollm2_gguf_path()
    except CheckpointError as error:
        pytest.skip(str(error))
    tokenizers["smollm2"] = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for name, tokenizer in tokenizers.items():
        table = token_bytes(tokenizer, len(tokenizer))
        assert table is not None, name
        first, rest = (np.asarray(a) for a in (table.first, table.rest))
        first_length, rest_length = np.asarray(table.first_length), np.asarray(table.rest_length)
        whole = [v for v in range(len(tokenizer)) if 0xFF not in first[v, :first_length[v]]]
        rng = np.random.RandomState(1)
        for _ in range(20):
            ids = [int(v) for v in rng.choice(whole, 64)]
            joined = bytes(first[ids[0], :first_length[ids[0]]]) + b"".join(
                bytes(rest[v, :rest_length[v]]) for v in ids[1:])
            assert tokenizer.decode(ids, skip_special_tokens=True).encode() == joined, (name, ids)
        assert len(whole) > 0.9 * len(tokenizer), name


def test_advance_reads_a_texts_first_token_without_its_leading_space():
    """With pieces '15' first and ' 15' later (a decoder that drops the text's leading space), the text of
    ids 15, 6, 15 is '15 6 15': ' 15' is found at the third token, not the first; '5 6' at the second."""
    import jax.numpy as jnp

    from hrjax.generate.stops import advance

    table = token_bytes(SpaceJoinedIds(), 300)
    stops = [(" 15",), ("5 6",), ("7",)]
    automata = [stop_automaton(s, 16) for s in stops]
    transitions, accepting = (jnp.asarray(np.stack(a)) for a in zip(*automata))
    state, started = jnp.zeros(3, jnp.int32), jnp.zeros(3, bool)
    hits = []
    for token in (15, 6, 15):
        state, started, hit = advance(jnp.full(3, token), state, started, jnp.ones(3, bool), table, transitions,
                                      accepting)
        hits.append(np.asarray(hit).tolist())
    assert hits == [[False, False, False], [False, True, False], [True, False, False]]
