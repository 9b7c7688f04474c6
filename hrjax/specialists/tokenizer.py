"""One character-level tokenizer shared by every specialist, so the pool splices token ids between hops."""

from __future__ import annotations

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def char_tokenizer(alphabet: str):
    """A `transformers.PreTrainedTokenizerFast`: one token per character of `alphabet` (ids after the
    specials, in alphabet order), anything else `<unk>`; `encode` prepends `<s>`, `decode` joins
    the characters without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"The alphabet {alphabet!r} repeats characters; list each once.")
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(alphabet))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[UNK_ID]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[BOS_ID]} $A", special_tokens=[(SPECIALS[BOS_ID], BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[PAD_ID], bos_token=SPECIALS[BOS_ID],
                                   eos_token=SPECIALS[EOS_ID], unk_token=SPECIALS[UNK_ID])
