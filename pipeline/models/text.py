"""T5 umt5-xxl text encoder (Wan's `models_t5_umt5-xxl-enc-bf16.pth`) on transformers' UMT5EncoderModel.

The official file is a state dict in Wan's own key names; the functions here translate those names to
transformers' (and back, for writing tiny test checkpoints), infer the config from the tensor shapes,
and `TextEncoder` reproduces the official prompt path: clean, tokenise to 512 with a mask, encode,
keep each prompt's real tokens.
"""

import html
import json
import re
import string
from collections.abc import Mapping
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

# Every prompt is tokenised to this many tokens (Wan's `text_len`); the DiT expects contexts of this length.
TEXT_LEN = 512

# Per-block tensors: official name after `blocks.N.` -> transformers name after `encoder.block.N.`.
# umt5 has its own relative position table in every block (Wan builds it with shared_pos=False), and
# transformers' UMT5 likewise gives every block's self-attention a `relative_attention_bias`.
# The gated FFN is fc2(fc1(x) * gelu(gate(x))): `gate.0` is the gelu branch, transformers' wi_0.
_T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_BLOCK_KEYS_INVERSE = {hf: official for official, hf in _T5_BLOCK_KEYS.items()}


def t5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> UMT5Config:
    """UMT5Config for an official-layout T5 encoder, read from its tensor shapes (official key -> shape)."""
    num_layers = len({int(m[1]) for key in shapes if (m := re.match(r"blocks\.(\d+)\.", key))})
    vocab_size, d_model = shapes["token_embedding.weight"]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    inner_dim = shapes["blocks.0.attn.q.weight"][0]  # [heads * d_kv, d_model]
    d_ff = shapes["blocks.0.ffn.fc1.weight"][0]  # [d_ff, d_model]
    # The rest is fixed by Wan's T5 code: max_dist 128, tanh-GELU gate, RMS norm eps 1e-6.
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )


def t5_tensors_from_official(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """transformers (key, tensor) pairs for one official tensor; KeyError for a key Wan's T5 does not have."""
    if key == "token_embedding.weight":
        # UMT5EncoderModel ties the encoder's embedding to `shared`; strict loading wants both names.
        return [("shared.weight", tensor), ("encoder.embed_tokens.weight", tensor)]
    if key == "norm.weight":
        return [("encoder.final_layer_norm.weight", tensor)]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m[2] in _T5_BLOCK_KEYS:
        return [(f"encoder.block.{m[1]}.{_T5_BLOCK_KEYS[m[2]]}", tensor)]
    raise KeyError(f"unknown T5 key {key!r}")


def t5_state_dict_to_official(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `t5_tensors_from_official` over a whole UMT5EncoderModel state dict."""
    official = {}
    for key, tensor in hf_state_dict.items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied twin of shared.weight: the official file holds the embedding once
        if key == "shared.weight":
            official["token_embedding.weight"] = tensor
        elif key == "encoder.final_layer_norm.weight":
            official["norm.weight"] = tensor
        elif (m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)) and m[2] in _T5_BLOCK_KEYS_INVERSE:
            official[f"blocks.{m[1]}.{_T5_BLOCK_KEYS_INVERSE[m[2]]}"] = tensor
        else:
            raise KeyError(f"unknown UMT5EncoderModel key {key!r}")
    return official


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning, applied to every prompt before tokenising.

    ftfy repairs mojibake and also uncurls quotes, unfolds ligatures and narrows full-width characters,
    which changes the tokens; HTML entities are unescaped twice; runs of whitespace become one space.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompts -> umt5 hidden states of their real tokens, as Wan's T5EncoderModel computes them."""

    def __init__(self, model: UMT5EncoderModel, tokenizer_dir: str | Path, text_len: int = TEXT_LEN):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.text_len = text_len

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One [L_i, d_model] tensor per prompt: its tokens including the closing </s>, padding dropped.

        Every prompt is padded to text_len and encoded with the padding masked out, as the official code
        does; the caller pads back to text_len with zeros where the DiT needs it.
        """
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,  # appends </s>, kept even when the prompt is truncated
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.model.device)  # [B, text_len]
        mask = tokens.attention_mask.to(self.model.device)  # [B, text_len], 1 for real tokens
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, d_model]
        lengths = mask.sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]


def write_tiny_t5_tokenizer(directory: str | Path, vocab_size: int) -> None:
    """Write a small umt5-like tokenizer (tokenizer.json + tokenizer_config.json) that AutoTokenizer loads.

    Like umt5's: a sentencepiece-style Unigram model, <pad>=0, </s>=1 appended to every text, <unk>=2.
    Its pieces are the printable ASCII characters (each also with a leading '▁' word marker) and then
    '▁' + two lowercase letters until vocab_size is reached. Same arguments, same bytes.
    """
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = ["▁"] + [p for c in chars for p in ("▁" + c, c)]
    pieces += ["▁" + a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    specials = ["<pad>", "</s>", "<unk>"]
    if not len(specials) < vocab_size <= len(specials) + len(pieces):
        raise ValueError(f"vocab_size must be in ({len(specials)}, {len(specials) + len(pieces)}], got {vocab_size}")
    # Equal scores: the Unigram segmentation then simply uses as few pieces as it can.
    vocab = [(s, 0.0) for s in specials] + [(p, -5.0) for p in pieces[: vocab_size - len(specials)]]

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # transformers' T5Tokenizer rebuilds these three from its own code; they are written too so that the
    # file alone describes the same tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,  # no <extra_id_N> sentinels: they would be appended past the tiny vocabulary
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
