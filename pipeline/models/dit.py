"""Wan2.1 image-to-video DiT with InfiniteTalk's audio modules, in the original Wan key layout.

Reads top to bottom: config, helpers (norms, RoPE, timestep embedding), self-attention, text/image
cross-attention, audio projection, per-frame audio cross-attention, the block, the head, the model.
Module attribute names are the official state-dict names, so the official shards plus the
InfiniteTalk file load with strict=True and no renaming.

Shapes: B batch, F latent frames, L = F*h*w tokens (h, w = latent size / 2), D model dim, S speakers.
Precision: matrices run in the base dtype; norms, adaLN modulation, the timestep embedding and the
head run in fp32 (see `keeps_fp32`), as the official code does with autocast.
"""

import json
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.kernels.attention import AttentionFn, sdpa_attention


@dataclass(frozen=True)
class DiTConfig:
    # Wan2.1-I2V-14B values; `config.json` of the checkpoint overrides the first block.
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36  # 16 noisy latent + 4 mask + 16 conditioning latent
    out_dim: int = 16
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    text_dim: int = 4096  # T5 umt5-xxl
    clip_dim: int = 1280  # CLIP ViT-H/14
    clip_tokens: int = 257
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # InfiniteTalk audio modules; these come from the audio file's tensor shapes (no config ships).
    audio_dim: int = 768  # wav2vec2 hidden size
    audio_layers: int = 12  # wav2vec2 layers stacked per frame
    audio_hidden: int = 512
    audio_tokens: int = 32  # tokens per latent frame per speaker
    audio_window: int = 5  # wav2vec2 frames around each video frame (offsets -2..+2)
    vae_stride_t: int = 4  # video frames per latent frame (after the first)

    @classmethod
    def from_wan_json(cls, path: str | Path, **audio) -> "DiTConfig":
        """The checkpoint's config.json (diffusers-style keys) plus the audio module sizes."""
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type", "i2v") != "i2v":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r}; InfiniteTalk needs an i2v model")
        known = {f.name for f in fields(cls)}
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        ignored = set(raw) - known - {"_class_name", "_diffusers_version", "model_type"}
        if ignored:
            raise ValueError(f"{path}: unknown config keys {sorted(ignored)}")
        return cls(**arch, **audio)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def keeps_fp32(name: str) -> bool:
    """Parameters that stay fp32 whatever the base dtype: every norm, the adaLN modulation, the
    timestep embedding and the output head (small, and where bf16 rounding would be felt)."""
    parts = name.split(".")
    return (
        parts[0] in ("time_embedding", "time_projection", "head")
        or "modulation" in parts
        or any(p.startswith("norm") for p in parts)
        or name.startswith(("img_emb.proj.0.", "img_emb.proj.4."))
    )


# ---------------------------------------------------------------------------------------------- helpers


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in fp32, returned in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps)


class LayerNorm(nn.Module):
    """Affine LayerNorm in fp32 (weights kept fp32), output in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return layer_norm(x, self.eps, self.weight.float(), self.bias.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] (cos then sin), computed in float64 as the official."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_angles(positions: torch.Tensor, pairs: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angle of each (position, frequency pair), in float64: [N] -> [N, pairs]."""
    inv_freq = 1.0 / theta ** (torch.arange(pairs, dtype=torch.float64) * 2 / (2 * pairs))
    return positions.to(torch.float64)[:, None] * inv_freq[None].to(positions.device)


# Two grids: a full window's and the latest shorter one's. Each table stays on the GPU (24 MiB for a
# 480p window), so keeping every length a manifest's last windows have would grow memory job by job.
@lru_cache(maxsize=2)
def rope_3d_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device):
    """cos/sin tables [L, head_dim/2] for Wan's 3D RoPE over a (frames, rows, cols) token grid.

    The head dim's complex pairs are split into time, row and column parts of sizes
    c - 2*(c//3), c//3, c//3 (c = head_dim/2); each part rotates by its own coordinate.
    """
    f, h, w = grid
    c = head_dim // 2
    sizes = (c - 2 * (c // 3), c // 3, c // 3)
    # Each part uses frequencies theta^(-2i/d_part) with d_part = 2*size, as Wan's rope_params does.
    t_ang, h_ang, w_ang = (rope_angles(torch.arange(n), size) for n, size in zip(grid, sizes))
    angles = torch.cat(
        [
            t_ang[:, None, None].expand(f, h, w, -1),
            h_ang[None, :, None].expand(f, h, w, -1),
            w_ang[None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, c)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent element pairs (x[2i], x[2i+1]) of the last dim by the given angles, in fp32.

    x [B, L, H, D] with cos/sin [L, D/2]. Same as multiplying by e^{i*angle} after
    `view_as_complex` on adjacent pairs, which is the pairing both Wan and InfiniteTalk use.
    """
    x = x.float().unflatten(-1, (-1, 2))
    re, im = x[..., 0], x[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def modulate(x_norm32: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x_norm32 * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)  # over the full dim, before splitting heads
        self.norm_k = RMSNorm(dim, eps)
        self.attend: AttentionFn = sdpa_attention

    def forward(self, x, rope):
        """x [B, L, D] -> (out [B, L, D], q, k after RoPE, [B, L, H, Dh] fp32)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k = rotate_pairs(q, *rope), rotate_pairs(k, *rope)
        out = self.attend(q, k, v).flatten(2).to(x.dtype)
        return self.o(out), q, k


class ImageTextCrossAttention(nn.Module):
    """Wan I2V cross-attention: the video tokens attend to the CLIP tokens and to the T5 tokens
    separately (one shared query), and the two results are summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, clip_tokens: int):
        super().__init__()
        self.num_heads = num_heads
        self.clip_tokens = clip_tokens
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_k_img = RMSNorm(dim, eps)
        self.attend: AttentionFn = sdpa_attention

    def forward(self, x, context):
        """x [B, L, D]; context [B, 257 + text_len, D] (image tokens first). All text tokens are
        attended, the zero padding included, as the official does (it passes no text lengths)."""
        heads = (self.num_heads, -1)
        img, text = context[:, : self.clip_tokens], context[:, self.clip_tokens :]
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(text)).unflatten(-1, heads)
        v = self.v(text).unflatten(-1, heads)
        k_img = self.norm_k_img(self.k_img(img)).unflatten(-1, heads)
        v_img = self.v_img(img).unflatten(-1, heads)
        out = self.attend(q, k, v).flatten(2) + self.attend(q, k_img, v_img).flatten(2)
        return self.o(out.to(x.dtype))


class AudioProjection(nn.Module):
    """wav2vec2 features -> `audio_tokens` tokens per latent frame.

    Input: per video frame, a window of `audio_window` wav2vec2 frames (offsets -2..+2), each with
    all layers: [B, T, window, layers, C] with T = 1 + 4*(F-1). Latent frame 0 is video frame 0 and
    uses its whole window (proj1). Every later latent frame covers 4 video frames and uses 8 audio
    frames (proj1_vf): the first video frame's offsets -2..0, the two middle frames' offset 0, the
    last frame's offsets 0..+2.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        window, stride = cfg.audio_window, cfg.vae_stride_t
        per_frame = cfg.audio_layers * cfg.audio_dim
        self.window, self.stride, self.tokens, self.dim = window, stride, cfg.audio_tokens, cfg.audio_dim
        self.eps = 1e-5  # nn.LayerNorm's default, which the official audio norm uses
        self.proj1 = nn.Linear(window * per_frame, cfg.audio_hidden)
        self.proj1_vf = nn.Linear((window + stride - 1) * per_frame, cfg.audio_hidden)
        self.proj2 = nn.Linear(cfg.audio_hidden, cfg.audio_hidden)
        self.proj3 = nn.Linear(cfg.audio_hidden, cfg.audio_tokens * cfg.audio_dim)
        self.norm = LayerNorm(cfg.audio_dim, self.eps)

    def later_frame_windows(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, window, layers, C] -> [B, F-1, window + stride - 1, layers, C] for latent frames 1.."""
        mid = self.window // 2
        groups = audio[:, 1:].unflatten(1, (-1, self.stride))  # [B, F-1, 4, window, layers, C]
        first = groups[:, :, 0, : mid + 1]  # offsets -2..0 of the group's first video frame
        middle = groups[:, :, 1:-1, mid]  # offset 0 of the middle frames
        last = groups[:, :, -1, mid:]  # offsets 0..+2 of the group's last video frame
        return torch.cat([first, middle, last], dim=2)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, window, layers, C] -> [B, F, tokens, C]."""
        first = F.relu(self.proj1(audio[:, :1].flatten(2)))  # [B, 1, hidden]
        later = F.relu(self.proj1_vf(self.later_frame_windows(audio).flatten(2)))  # [B, F-1, hidden]
        x = F.relu(self.proj2(torch.cat([first, later], dim=1)))
        x = self.proj3(x).unflatten(-1, (self.tokens, self.dim))
        return self.norm(x)


class AudioCrossAttention(nn.Module):
    """Per-latent-frame attention from the video tokens to that frame's audio tokens.

    One speaker: plain attention. Two speakers (L-RoPE): every video token gets a 1D RoPE position
    from the reference region it attends to most (speaker 1 mapped into [0, 4], speaker 2 into
    [20, 24], background 12); speaker 1's audio keys sit at 2, speaker 2's at 22, so a token is
    drawn to the voice of the person it belongs to.
    """

    SPEAKER_RANGES = ((0.0, 4.0), (20.0, 24.0))
    BACKGROUND_POSITION = 12.0

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attend: AttentionFn = sdpa_attention

    def token_positions(self, ref_map: torch.Tensor) -> torch.Tensor:
        """ref_map [B, 3, L] (speaker 1, speaker 2, background) -> L-RoPE position per token [B, L]."""
        lo, hi = ref_map.amin(dim=2, keepdim=True), ref_map.amax(dim=2, keepdim=True)
        unit = (ref_map - lo) / (hi - lo + 1e-8)
        ranges = torch.tensor(self.SPEAKER_RANGES, dtype=unit.dtype, device=unit.device)
        speakers = unit[:, :2] * (ranges[:, 1:] - ranges[:, :1]) + ranges[:, :1]
        background = torch.full_like(unit[:, 2:], self.BACKGROUND_POSITION)
        candidates = torch.cat([speakers, background], dim=1)
        return candidates.gather(1, ref_map.argmax(dim=1, keepdim=True)).squeeze(1)

    def reference_map(self, q, k, token_masks):
        """`reference_attention_map` of the block's self-attention q, k (k's first h*w tokens are latent
        frame 0). A method so that sequence parallelism (pipeline/parallel.py) can bring frame 0's keys
        from the rank that holds them."""
        return reference_attention_map(q, k, token_masks, token_masks.shape[1])

    def forward(self, x, audio_tokens, frames: int, ref_map=None):
        """x [B, L, D]; audio_tokens [B, F, S*tokens, C_audio]; ref_map [B, 3, L] when S == 2."""
        b, length, dim = x.shape
        heads = (self.num_heads, -1)
        q = self.q_linear(x).unflatten(-1, heads)  # [B, L, H, Dh]
        k, v = self.kv_linear(audio_tokens).unflatten(-1, (2, *heads)).unbind(-3)  # [B, F, N_a, H, Dh]
        if ref_map is not None:
            head_dim = q.shape[-1]
            angles = rope_angles(self.token_positions(ref_map).flatten(), head_dim // 2)
            q = rotate_pairs(q.flatten(0, 1)[None], angles.cos().float(), angles.sin().float())
            q = q.view(b, length, *q.shape[-2:]).to(x.dtype)
            n_audio = k.shape[2]
            key_pos = torch.tensor([sum(r) / 2 for r in self.SPEAKER_RANGES], device=x.device)
            key_pos = key_pos.repeat_interleave(n_audio // 2)
            k_angles = rope_angles(key_pos, head_dim // 2)
            k = rotate_pairs(k.flatten(0, 1), k_angles.cos().float(), k_angles.sin().float())
            k = k.view(b, frames, *k.shape[1:]).to(x.dtype)
        q = q.unflatten(1, (frames, -1)).flatten(0, 1)  # [(B F), L/F, H, Dh]
        out = self.attend(q, k.flatten(0, 1), v.flatten(0, 1))
        return self.proj(out.reshape(b, length, dim).to(x.dtype))


def reference_attention_map(q, k, token_masks, tokens_per_frame: int, chunk: int = 4096):
    """How much each video token attends to each reference region, averaged over heads.

    q, k [B, L, H, Dh] from self-attention (after RoPE); the keys are those of latent frame 0 (the
    reference frame). token_masks [3, tokens_per_frame] in {0, 1}. Returns [B, 3, L]:
    mean over heads of sum over the region's keys of softmax(q.k/sqrt(Dh)), divided by the region's
    size. Queries are processed in chunks so the [H, L, h*w] probabilities never exist at once.
    """
    ref_k = k[:, :tokens_per_frame].transpose(1, 2)  # [B, H, hw, Dh]
    weights = token_masks.to(q.dtype) / token_masks.sum(dim=1, keepdim=True).clamp_min(1).to(q.dtype)
    out = []
    for start in range(0, q.shape[1], chunk):
        qc = q[:, start : start + chunk].transpose(1, 2)  # [B, H, c, Dh]
        probs = torch.softmax(qc @ ref_k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out.append((probs @ weights.T).mean(dim=1))  # [B, c, 3]
    return torch.cat(out, dim=1).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- block


class Block(nn.Module):
    """adaLN self-attention -> image/text cross-attention -> audio cross-attention -> adaLN FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.eps = eps
        self.self_attn = SelfAttention(dim, cfg.num_heads, eps)
        self.norm3 = LayerNorm(dim, eps)
        self.cross_attn = ImageTextCrossAttention(dim, cfg.num_heads, eps, cfg.clip_tokens)
        self.norm_x = LayerNorm(dim, eps)
        self.audio_cross_attn = AudioCrossAttention(dim, cfg.audio_dim, cfg.num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e, rope, context, audio_tokens, frames: int, token_masks=None):
        """x [B, L, D]; e [B, 6, D] fp32 time projection; token_masks [3, h*w] only for two speakers."""
        dtype = x.dtype
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation.float() + e).unbind(1)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
            t[:, None] for t in (shift_a, scale_a, gate_a, shift_f, scale_f, gate_f)
        )

        y, q, k = self.self_attn(modulate(layer_norm(x, self.eps), shift_a, scale_a).to(dtype), rope)
        x = (x.float() + y.float() * gate_a).to(dtype)

        x = x + self.cross_attn(self.norm3(x), context)

        ref_map = None
        if token_masks is not None:
            ref_map = self.audio_cross_attn.reference_map(q.to(dtype), k.to(dtype), token_masks)
        x = x + self.audio_cross_attn(self.norm_x(x), audio_tokens, frames, ref_map)

        y = self.ffn(modulate(layer_norm(x, self.eps), shift_f, scale_f).to(dtype))
        return (x.float() + y.float() * gate_f).to(dtype)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x, e):
        """x [B, L, D], e [B, D] fp32 -> [B, L, out_dim * patch volume] fp32."""
        shift, scale = (self.modulation.float() + e[:, None]).unbind(1)
        x = modulate(layer_norm(x, self.eps), shift[:, None], scale[:, None])
        return self.head(x.to(self.head.weight.dtype)).float()


class ImageEmbedding(nn.Module):
    """CLIP tokens (1280) -> model dim: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, x):
        norm_in, fc1, act, fc2, norm_out = self.proj
        dtype = fc1.weight.dtype
        x = layer_norm(x, norm_in.eps, norm_in.weight.float(), norm_in.bias.float()).to(dtype)
        x = fc2(act(fc1(x)))
        return layer_norm(x, norm_out.eps, norm_out.weight.float(), norm_out.bias.float()).to(dtype)


# ---------------------------------------------------------------------------------------------- model


class WanInfiniteTalkDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_emb = ImageEmbedding(cfg.clip_dim, dim)
        self.audio_proj = AudioProjection(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def embed_context(self, text: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        """text [B, text_len, text_dim] (zero-padded), clip_tokens [B, 257, clip_dim] -> [B, 257+text_len, D]."""
        dtype = self.text_embedding[0].weight.dtype
        return torch.cat([self.img_emb(clip_tokens.to(dtype)), self.text_embedding(text.to(dtype))], dim=1)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, S, T, window, layers, C] -> [B, F, S*tokens, C] (speaker 1's tokens first)."""
        b, s = audio.shape[:2]
        tokens = self.audio_proj(audio.flatten(0, 1).to(self.audio_proj.proj1.weight.dtype))
        return tokens.unflatten(0, (b, s)).transpose(1, 2).flatten(2, 3)

    def forward(self, x, t, text, clip_tokens, y, audio, ref_masks=None):
        """One denoising step's velocity.

        x     [B, 16, F, H, W]  noisy latent           t     [B] timesteps in [0, 1000]
        text  [B, text_len, 4096] T5 tokens, zero-padded (see `pad_text`)
        clip_tokens [B, 257, 1280]                     y     [B, 20, F, H, W] mask + conditioning latent
        audio [B, S, 4F-3, 5, layers, C] wav2vec2 windows per video frame, S = 1 or 2 speakers
        ref_masks [3, h, w] speaker 1 / speaker 2 / background masks (any resolution); needed for S = 2
        -> velocity [B, 16, F, H, W] in fp32
        """
        speakers = audio.shape[1]
        if speakers == 2 and ref_masks is None:
            raise ValueError("two speakers need ref_masks (speaker 1, speaker 2, background)")
        if speakers not in (1, 2):
            raise ValueError(f"audio has {speakers} speakers; InfiniteTalk supports 1 or 2")
        dtype = self.patch_embedding.weight.dtype

        x = self.patch_embedding(torch.cat([x, y], dim=1).to(dtype))  # [B, D, F, h, w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, L, D]; contiguous: the 40 blocks run faster on it
        rope = rope_3d_tables(grid, self.cfg.head_dim, x.device)

        time_dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(time_dtype))  # [B, D]
        e6 = self.time_projection(e).float().unflatten(1, (6, self.cfg.dim))
        e = e.float()
        context = self.embed_context(text, clip_tokens)
        audio_tokens = self.embed_audio(audio).to(dtype)

        token_masks = None
        if speakers == 2:
            masks = F.interpolate(ref_masks[None].float(), size=grid[1:], mode="nearest")[0]
            token_masks = (masks > 0).flatten(1)

        for block in self.blocks:
            x = block(x, e6, rope, context, audio_tokens, grid[0], token_masks)
        return self.unpatchify(self.head(x, e), grid)

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, L, out*pt*ph*pw] -> [B, out, F*pt, h*ph, w*pw]."""
        pt, ph, pw = self.cfg.patch_size
        x = x.view(x.shape[0], *grid, pt, ph, pw, self.cfg.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        f, h, w = grid
        return x.reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw).float()


def pad_text(embeddings: list[torch.Tensor], text_len: int) -> torch.Tensor:
    """Per-prompt T5 outputs [L_i, C] -> [B, text_len, C], zero-padded as the official DiT does."""
    return torch.stack([F.pad(e, (0, 0, 0, text_len - e.shape[0])) for e in embeddings])
