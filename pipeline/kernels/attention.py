"""Attention backends: the one place where the choice of attention kernel lives.

Every attention in the models calls a function with the signature

    attend(q, k, v) -> out        q [B, Lq, H, D], k and v [B, Lk, H, D], out [B, Lq, H, D]

(the "NHD" layout Wan uses), unmasked, scale 1/sqrt(D). `get_attention(name)` returns the backend a
user asked for or raises if it cannot run here; there is no silent fallback to another kernel.
"""

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention; q and k are cast to v's dtype as the official code does
    (RoPE leaves them in fp32)."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}


def get_attention(name: str) -> AttentionFn:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; available: {sorted(BACKENDS)}")
    return BACKENDS[name]
