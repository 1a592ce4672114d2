"""T5 text encoder: official key layout -> transformers UMT5, checked against a naive float64 forward
written here from Wan's T5 formulas on the official keys."""

import math
import re

import pytest
import torch
from transformers import UMT5EncoderModel

from pipeline.models.text import (
    TEXT_LEN,
    TextEncoder,
    clean_prompt,
    t5_config_from_shapes,
    t5_state_dict_to_official,
    t5_tensors_from_official,
    write_tiny_t5_tokenizer,
)

# Tiny umt5: d_kv * heads (24) differs from d_model (32) so the config inference has to get d_kv right;
# the model's vocabulary is larger than the tokenizer's, as in umt5-xxl (256384 vs ~256300).
VOCAB, TOKENIZER_VOCAB, D_MODEL, D_KV, D_FF, HEADS, LAYERS, BUCKETS = 300, 256, 32, 6, 48, 4, 2, 32


def official_t5_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Wan's T5 encoder layout, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    inner = HEADS * D_KV
    sd = {"token_embedding.weight": randn(VOCAB, D_MODEL, std=1.0)}
    for n in range(LAYERS):
        b = f"blocks.{n}."
        sd[b + "norm1.weight"] = 1 + randn(D_MODEL, std=0.1)
        sd[b + "attn.q.weight"] = randn(inner, D_MODEL, std=D_MODEL**-0.5)
        sd[b + "attn.k.weight"] = randn(inner, D_MODEL, std=D_MODEL**-0.5)
        sd[b + "attn.v.weight"] = randn(inner, D_MODEL, std=D_MODEL**-0.5)
        sd[b + "attn.o.weight"] = randn(D_MODEL, inner, std=inner**-0.5)
        sd[b + "norm2.weight"] = 1 + randn(D_MODEL, std=0.1)
        sd[b + "ffn.gate.0.weight"] = randn(D_FF, D_MODEL, std=D_MODEL**-0.5)
        sd[b + "ffn.fc1.weight"] = randn(D_FF, D_MODEL, std=D_MODEL**-0.5)
        sd[b + "ffn.fc2.weight"] = randn(D_MODEL, D_FF, std=D_FF**-0.5)
        sd[b + "pos_embedding.embedding.weight"] = randn(BUCKETS, HEADS, std=1.0)
    sd["norm.weight"] = 1 + randn(D_MODEL, std=0.1)
    return sd


def converted(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = {}
    for key, tensor in official.items():
        for hf_key, hf_tensor in t5_tensors_from_official(key, tensor):
            assert hf_key not in hf, f"{hf_key} produced twice"
            hf[hf_key] = hf_tensor
    return hf


def build_model(official: dict[str, torch.Tensor]) -> UMT5EncoderModel:
    config = t5_config_from_shapes({k: tuple(v.shape) for k, v in official.items()})
    model = UMT5EncoderModel(config).eval()
    model.load_state_dict(converted(official), strict=True)
    return model


# --- naive reference: Wan's T5Encoder (shared_pos=False) in float64, on the official keys -------------


def relative_position_buckets(length: int, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    """[L, L] bucket of key position j for query position i: Wan's bidirectional T5RelativeEmbedding.

    The log is taken in float64 here and in float32 by Wan; both give the same bucket for every distance
    below 5000 (checked), so the difference cannot matter at 512 tokens.
    """

    def bucket(rel: int) -> int:  # rel = key position - query position
        half = num_buckets // 2  # one half for keys before the query, one for keys after
        exact = half // 2  # distances below this get a bucket each, larger ones log-spaced up to max_dist
        dist = abs(rel)
        if dist < exact:
            offset = dist
        else:
            offset = min(exact + int(math.log(dist / exact) / math.log(max_dist / exact) * (half - exact)), half - 1)
        return (half if rel > 0 else 0) + offset

    table = torch.tensor([bucket(rel) for rel in range(-(length - 1), length)])
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    return table[rel + length - 1]


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def naive_t5_encoder(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids, mask [B, L] -> [B, L, D] (float64)."""
    w = {k: v.double() for k, v in sd.items()}
    b, length = ids.shape
    x = w["token_embedding.weight"][ids]  # [B, L, D]
    buckets = relative_position_buckets(length, BUCKETS)
    masked = (mask == 0)[:, None, None, :]  # [B, 1, 1, L]: padded keys
    for n in range(LAYERS):
        p = f"blocks.{n}."
        h = rms_norm(x, w[p + "norm1.weight"])
        q = (h @ w[p + "attn.q.weight"].T).view(b, length, HEADS, D_KV)
        k = (h @ w[p + "attn.k.weight"].T).view(b, length, HEADS, D_KV)
        v = (h @ w[p + "attn.v.weight"].T).view(b, length, HEADS, D_KV)
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [H, L, L]
        scores = torch.einsum("bihc,bjhc->bhij", q, k) + bias  # T5: no 1/sqrt(d) scaling
        scores = scores.masked_fill(masked, torch.finfo(torch.float64).min)
        attn = torch.einsum("bhij,bjhc->bihc", scores.softmax(-1), v).reshape(b, length, HEADS * D_KV)
        x = x + attn @ w[p + "attn.o.weight"].T
        h = rms_norm(x, w[p + "norm2.weight"])
        gated = (h @ w[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ w[p + "ffn.gate.0.weight"].T)
        x = x + gated @ w[p + "ffn.fc2.weight"].T
    return rms_norm(x, w["norm.weight"])


# --- tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("umt5_tokenizer")
    write_tiny_t5_tokenizer(directory, TOKENIZER_VOCAB)
    return directory


def test_config_recovered_from_shapes():
    config = t5_config_from_shapes({k: tuple(v.shape) for k, v in official_t5_state_dict().items()})
    assert (config.vocab_size, config.d_model, config.d_kv, config.d_ff) == (VOCAB, D_MODEL, D_KV, D_FF)
    assert (config.num_heads, config.num_layers, config.relative_attention_num_buckets) == (HEADS, LAYERS, BUCKETS)
    assert config.relative_attention_max_distance == 128
    assert config.feed_forward_proj == "gated-gelu" and config.dense_act_fn == "gelu_new"  # tanh GELU
    assert config.layer_norm_epsilon == 1e-6


def test_every_official_key_converted_and_none_invented():
    official = official_t5_state_dict()
    model = UMT5EncoderModel(t5_config_from_shapes({k: tuple(v.shape) for k, v in official.items()}))
    hf = converted(official)
    assert set(hf) == set(model.state_dict())
    assert all(t5_tensors_from_official(k, v) for k, v in official.items())
    assert hf["encoder.embed_tokens.weight"] is hf["shared.weight"]


def test_inverse_round_trips():
    official = official_t5_state_dict()
    back = t5_state_dict_to_official(build_model(official).state_dict())
    assert set(back) == set(official)
    for key, tensor in official.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize(
    "key", ["blocks.0.attn.qkv.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "head.weight"]
)
def test_unknown_key_raises_naming_it(key):
    with pytest.raises(KeyError, match=re.escape(key)):
        t5_tensors_from_official(key, torch.zeros(1))


def test_tokenizer_is_umt5_like_and_deterministic(tokenizer_dir, tmp_path):
    write_tiny_t5_tokenizer(tmp_path, TOKENIZER_VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    encoder = TextEncoder(build_model(official_t5_state_dict()), tokenizer_dir)
    tok = encoder.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (0, 1, 2, TOKENIZER_VOCAB)
    ids = tok(["a cat"], padding="max_length", max_length=8).input_ids[0]
    assert ids[:3] == tok.convert_tokens_to_ids(["▁a", "▁ca", "t"]) and ids[3:] == [1, 0, 0, 0, 0]


def test_prompt_cleaning_matches_wan():
    # ftfy uncurls quotes and unfolds ligatures, HTML entities are unescaped (twice), whitespace collapses.
    assert clean_prompt("  \u201cA\u201d  \ufb01sh &amp;amp;\n\tdog ") == '"A" fish & dog'


def test_encode_matches_naive_official_forward(tokenizer_dir):
    official = official_t5_state_dict()
    encoder = TextEncoder(build_model(official), tokenizer_dir)
    prompts = ["a cat sits on the mat, looking at the camera.", "Hi", "ab " * 600]  # the last is truncated
    out = encoder.encode(prompts)

    tokens = encoder.tokenizer(
        [clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=TEXT_LEN,
        return_tensors="pt",
    )
    assert tokens.input_ids.shape == (3, TEXT_LEN)
    reference = naive_t5_encoder(official, tokens.input_ids, tokens.attention_mask)
    lengths = tokens.attention_mask.sum(1).tolist()
    assert lengths[1] == 3 and lengths[2] == TEXT_LEN  # "▁H", "i", "</s>"; truncation keeps </s>
    assert tokens.input_ids[2, -1] == 1
    for o, ref, n in zip(out, reference, lengths):
        assert o.shape == (n, D_MODEL) and o.dtype == torch.float32
        # float32 model vs float64 reference: observed max abs error 4.4e-6 on values up to 3.4. With the
        # model in float64 it is 6e-7, all from the RMS-norm variance that Wan and transformers both take in
        # float32 (2.8e-15 when this reference does the same), so the formulas agree exactly.
        torch.testing.assert_close(o.double(), ref[:n], rtol=1e-5, atol=1e-5)
