"""Ulysses sequence parallelism for the DiT: one forward spread over the G processes of a group,
numerically the same as the forward on one.

    dist.init_process_group("nccl")            # or "gloo" on CPUs; one process per GPU
    sp = apply_sequence_parallel(model, group)  # group None: the default group
    velocity = model(x, t, ...)                 # every rank passes the same inputs, gets the whole output
    sp.remove()                                 # back to the plain model (optional)

SPMD: every rank holds the whole model, runs the same window loop with the same seeds and the same
inputs, and gets the full velocity back, so the samplers (and the VAE, the colour match...) stay in
lockstep. Only the DiT's blocks are split.

  inputs     A forward pre-hook on the model broadcasts its inputs from the group's first rank. The
             ranks' inputs should already be equal, but each rank decodes and re-encodes the window
             itself, and on GPUs those results can differ in the last bits (measured on 2 H200s: the
             next window's motion latents up to 0.025 apart); a forward whose slices were cut from
             different inputs would be no forward of any of them. Costs one copy of the inputs.

What is done to the model (from outside; the model code knows nothing of ranks):

  sharding   A forward pre-hook on block 0 cuts the token sequence [B, L, D] (L = F*h*w, frame-major)
             into G contiguous slices of Ls = ceil(L/G) tokens; rank r holds tokens [r*Ls, (r+1)*Ls).
             L need not divide by G: the sequence is padded with zero tokens to G*Ls, the padding sits at
             the end of the last rank(s), and it never mixes with real tokens (below). Every block's
             pre-hook swaps the 3D RoPE tables [L, Dh/2] for the rank's own rows, so RoPE rotates by
             each token's true (frame, row, column). A post-hook on the head all-gathers its output
             (small: [B, L, 64] fp32) and trims the padding, so `unpatchify` sees the whole sequence.
  self-attn  Ulysses. q, k, v [B, Ls, H, Dh] go through one all-to-all to [B, G*Ls, H/G, Dh] (all tokens,
             H/G heads), the padding tokens are cut off (so the attention is over exactly the L real
             keys, unmasked, as on one GPU), the model's own attention backend runs, and a second
             all-to-all brings the output back to [B, Ls, H, Dh]. Needs H % G == 0 (ValueError if not).
             q and k are cast to v's dtype before the exchange, which every backend does first anyway.
             The backend stays swappable: `apply_attention` after this still sets the inner function.
  text/img   cross-attention is per query token: it runs on the local tokens as is.
  audio      per-latent-frame attention. A rank's tokens start and end anywhere, inside a frame too:
             they are padded in front and behind to whole frames (f0..f1), attended frame by frame with
             those frames' audio tokens, and the padding rows are dropped (each query row's result
             depends only on that row, so this is exact). No padding when the slice is frame-aligned
             (117 frames at 832x480 on 2, 4 or 8 ranks: 30 frames of 1,560 tokens).
  ref map    two speakers: every token's attention to latent frame 0's keys. Frame 0 lives on rank 0
             (on the first ranks when a slice is shorter than a frame): each rank contributes its first
             min(Ls, h*w) keys to an all-gather, and the first h*w of the concatenation are frame 0.
             The L-RoPE positions normalise each map by its min and max over ALL tokens: those are
             all-reduced (MIN / MAX) over the ranks, the padding tokens excluded.

Communication per forward: the inputs (a few MB). Per block, per rank: the two all-to-alls move (G-1)/G of 4*B*Ls*D values; with two
speakers also the frame-0 keys and two [B, 3] all-reduces. Works with NCCL (GPUs) and gloo (CPU).
"""

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.kernels.attention import AttentionFn
from pipeline.models.dit import AudioCrossAttention, Block, SelfAttention, WanInfiniteTalkDiT


@dataclass(frozen=True)
class Shard:
    """The tokens one rank computes in the current forward."""

    tokens: int  # L, the real sequence length
    per_frame: int  # h*w tokens per latent frame
    ranks: int  # G
    rank: int

    @property
    def local(self) -> int:
        """Ls: tokens per rank, the padding included."""
        return -(-self.tokens // self.ranks)

    @property
    def padded(self) -> int:
        return self.local * self.ranks

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def stop(self) -> int:
        """End of this rank's real tokens (the padding starts here)."""
        return min(self.start + self.local, self.tokens)

    @property
    def real(self) -> int:
        return self.stop - self.start


class SequenceParallel:
    """Sequence parallelism applied to one model: the group, the current forward's shard, the hooks.
    Made by `apply_sequence_parallel`."""

    def __init__(self, model: WanInfiniteTalkDiT, group: dist.ProcessGroup | None):
        self.model, self.group = model, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.shard: Shard | None = None
        self._rope_cache: tuple | None = None
        self._handles: list = []
        self._swapped: list[tuple[nn.Module, type]] = []

    # ------------------------------------------------------------------ per forward

    def begin(self, tokens: int, frames: int) -> Shard:
        """The shard of a forward over `tokens` tokens in `frames` latent frames."""
        if tokens % frames:
            raise ValueError(f"{tokens} tokens do not split into {frames} latent frames")
        shard = Shard(tokens, tokens // frames, self.size, self.rank)
        if (self.size - 1) * shard.local >= tokens:  # the last rank would hold padding only
            raise ValueError(
                f"sequence parallelism over {self.size} ranks: {tokens} tokens leave a rank without real "
                f"tokens ({shard.local} per rank); use fewer ranks for so short a sequence"
            )
        self.shard = shard
        return shard

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequence [B, L, ...] -> this rank's slice [B, Ls, ...] (zero padding past L)."""
        s = self.shard
        if x.shape[1] != s.tokens:
            raise ValueError(f"expected the whole sequence of {s.tokens} tokens, got {x.shape[1]}")
        if s.padded != s.tokens:
            x = torch.cat([x, x.new_zeros(x.shape[0], s.padded - s.tokens, *x.shape[2:])], dim=1)
        # A fresh tensor, not .contiguous(): with B = 1 that returns the view itself, whose batch stride
        # differs from the later blocks' inputs and would make compiled blocks compile a second graph.
        return x[:, s.start : s.start + s.local].clone(memory_format=torch.contiguous_format)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice [B, Ls, ...] -> the whole sequence [B, L, ...] on every rank."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=1)[:, : self.shard.tokens]

    def local_rope(self, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the RoPE tables [L, Dh/2] for this rank's tokens (padding rows: angle 0)."""
        cos, sin = rope
        s = self.shard
        if cos.shape[0] != s.tokens:
            raise ValueError(f"RoPE tables have {cos.shape[0]} rows for {s.tokens} tokens")
        cached = self._rope_cache
        if cached is not None and cached[0] is cos and cached[1] is sin and cached[2] == s:
            return cached[3]
        pad = s.padded - s.tokens
        if pad:
            cos = torch.cat([cos, cos.new_ones(pad, cos.shape[1])])
            sin = torch.cat([sin, sin.new_zeros(pad, sin.shape[1])])
        local = (cos[s.start : s.start + s.local].contiguous(), sin[s.start : s.start + s.local].contiguous())
        self._rope_cache = (rope[0], rope[1], s, local)
        return local

    # ------------------------------------------------------------------ collectives of the blocks

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """send [G, ...]: chunk j goes to rank j; returns [G, ...] with chunk j from rank j."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def frame0_keys(self, k: torch.Tensor, per_frame: int) -> torch.Tensor:
        """Latent frame 0's keys [B, h*w, H, Dh] from the rank(s) holding them, on every rank.

        Each rank contributes its first m = min(Ls, h*w) keys. If Ls >= h*w, rank 0's part is frame 0;
        otherwise every part is a whole slice, and the slices in rank order start with frame 0."""
        m = min(self.shard.local, per_frame)
        return self.gather_parts(k[:, :m])[:, :per_frame]

    def gather_parts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=1)

    def from_first_rank(self, value):
        """`value` (a tensor, or a tuple or list of them; anything else as it is) as the group's first
        rank has it: a fresh copy on every rank."""
        if isinstance(value, torch.Tensor):
            value = value.clone(memory_format=torch.contiguous_format)
            dist.broadcast(value, src=dist.get_global_rank(self.group or dist.group.WORLD, 0), group=self.group)
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self.from_first_rank(v) for v in value)
        return value

    def global_range(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """values [B, C, n] -> (min, max) over the last dim and over all ranks, [B, C, 1] each."""
        lo = values.amin(dim=2, keepdim=True).float()
        hi = values.amax(dim=2, keepdim=True).float()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        return lo.to(values.dtype), hi.to(values.dtype)

    # ------------------------------------------------------------------ undo

    def remove(self) -> None:
        """Take the hooks off and give the modules their own classes back: the plain model again."""
        for handle in self._handles:
            handle.remove()
        for module, cls in self._swapped:
            inner = module.__dict__.pop("_inner_attend", None)
            for attr in ("_sp", "_ulysses"):
                module.__dict__.pop(attr, None)
            module.__class__ = cls
            if inner is not None:
                module.attend = inner
        self._handles, self._swapped = [], []
        self.shard = None
        self._rope_cache = None
        if getattr(self.model, "_sequence_parallel", None) is self:
            del self.model._sequence_parallel


# ---------------------------------------------------------------------------------------------- modules


def ulysses(sp: SequenceParallel, inner: AttentionFn) -> AttentionFn:
    """`inner` (any attention backend, NHD layout) over the whole sequence, called with and returning
    this rank's tokens: sequence-sharded -> head-sharded, attention, head-sharded -> sequence-sharded."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, g = sp.shard, sp.size
        b, n, h, d = v.shape
        hg = h // g
        # [G, 3, B, Ls, H/G, Dh]: chunk j holds head group j of q, k, v (q, k cast to v's dtype as
        # every backend does first; the copy does the cast and the transpose at once)
        send = torch.empty(g, 3, b, n, hg, d, dtype=v.dtype, device=v.device)
        for i, t in enumerate((q, k, v)):
            send[:, i].copy_(t.reshape(b, n, g, hg, d).permute(2, 0, 1, 3, 4))
        recv = sp.all_to_all(send)  # chunk j: rank j's tokens, this rank's head group
        full = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, g * n, hg, d)[:, :, : s.tokens]
        out = inner(full[0], full[1], full[2])  # [B, L, H/G, Dh], the real tokens only
        if s.padded != s.tokens:
            out = torch.cat([out, out.new_zeros(b, s.padded - s.tokens, hg, d)], dim=1)
        back = sp.all_to_all(out.reshape(b, g, n, hg, d).transpose(0, 1).contiguous())  # chunk j: head group j
        return back.permute(1, 2, 0, 3, 4).reshape(b, n, h, d)

    attend.__name__ = f"ulysses({getattr(inner, '__name__', repr(inner))})"
    return attend


class UlyssesSelfAttention(SelfAttention):
    """SelfAttention whose `attend` runs the assigned backend through Ulysses all-to-alls. Setting
    `.attend` (as `apply_attention` does) sets the inner backend; reading it gives the wrapper."""

    @property
    def attend(self) -> AttentionFn:
        return self._ulysses

    @attend.setter
    def attend(self, fn: AttentionFn) -> None:
        self._inner_attend = fn
        self._ulysses = ulysses(self._sp, fn)


class ShardedAudioCrossAttention(AudioCrossAttention):
    """AudioCrossAttention on a contiguous slice of the token sequence that may start and end inside
    a latent frame (see the module docstring)."""

    def reference_map(self, q, k, token_masks):
        return super().reference_map(q, self._sp.frame0_keys(k, token_masks.shape[1]), token_masks)

    def token_positions(self, ref_map):
        # min and max over all ranks' tokens: appended as two columns (they do not change the min or
        # max), so the parent normalises by them; their positions are dropped
        lo, hi = self._sp.global_range(ref_map)
        return super().token_positions(torch.cat([ref_map, lo, hi], dim=2))[:, :-2]

    def forward(self, x, audio_tokens, frames: int, ref_map=None):
        s = self._sp.shard
        hw = s.per_frame
        f0, f1 = s.start // hw, -(-s.stop // hw)
        lead, tail = s.start - f0 * hw, f1 * hw - s.stop
        xs = x[:, : s.real]
        if lead or tail:
            xs = F.pad(xs, (0, 0, lead, tail))
        if ref_map is not None:
            ref_map = ref_map[:, :, : s.real]
            if lead or tail:  # repeat edge values: the padding must not move the min or max
                ref_map = F.pad(ref_map, (lead, tail), mode="replicate")
        out = super().forward(xs, audio_tokens[:, f0:f1], f1 - f0, ref_map)[:, lead : lead + s.real]
        if s.real < x.shape[1]:
            out = F.pad(out, (0, 0, 0, x.shape[1] - s.real))
        return out


# ---------------------------------------------------------------------------------------------- apply

_BLOCK_ARGS = inspect.signature(Block.forward)


def _bind(module, args, kwargs) -> inspect.BoundArguments:
    bound = _BLOCK_ARGS.bind(module, *args, **kwargs)
    for name in ("x", "rope", "frames"):
        if name not in bound.arguments:
            raise TypeError(f"Block.forward has no argument {name!r}; pipeline/parallel.py needs updating")
    return bound


def check_sp_degree(heads: int, degree: int) -> None:
    """ValueError unless `degree` ranks can share a model with `heads` attention heads: Ulysses gives
    each rank heads / degree of them. farm.config.validate asks this before anything loads."""
    if degree < 1 or heads % degree:
        divisors = ", ".join(str(g) for g in range(1, heads + 1) if heads % g == 0)
        raise ValueError(
            f"Ulysses sequence parallelism splits the attention heads over the ranks: {heads} heads "
            f"do not divide by G = {degree} ranks (use a G that divides {heads}: {divisors})"
        )


def apply_sequence_parallel(model: WanInfiniteTalkDiT, group: dist.ProcessGroup | None = None) -> SequenceParallel:
    """Split every forward of `model` over the ranks of `group` (default: the whole world), in place.

    Every rank must hold the same weights and call the model with the same inputs; each gets the whole
    output. Raises ValueError if the head count does not divide by the group size, or if the model is
    already parallel."""
    if not dist.is_initialized():
        raise RuntimeError("apply_sequence_parallel needs torch.distributed initialised (init_process_group)")
    if getattr(model, "_sequence_parallel", None) is not None:
        raise ValueError("the model already has sequence parallelism applied")
    sp = SequenceParallel(model, group)
    check_sp_degree(model.cfg.num_heads, sp.size)
    if len(model.blocks) == 0:
        raise ValueError("the model has no blocks to parallelise")

    for block in model.blocks:
        for module, cls in ((block.self_attn, UlyssesSelfAttention), (block.audio_cross_attn, ShardedAudioCrossAttention)):
            if type(module) is not cls.__base__:
                raise TypeError(f"expected a {cls.__base__.__name__}, found {type(module).__name__}")
            inner = module.__dict__.pop("attend", None)
            module._sp = sp
            sp._swapped.append((module, type(module)))
            module.__class__ = cls  # as FSDP2's fully_shard does: same parameters and state-dict keys
            module.attend = inner  # on UlyssesSelfAttention, through the property: the inner backend

    def same_inputs(module, args, kwargs):
        return sp.from_first_rank(args), {name: sp.from_first_rank(v) for name, v in kwargs.items()}

    def first_block(module, args, kwargs):
        bound = _bind(module, args, kwargs)
        rope = bound.arguments["rope"]
        sp.begin(rope[0].shape[0], bound.arguments["frames"])
        bound.arguments["x"] = sp.split(bound.arguments["x"])
        bound.arguments["rope"] = sp.local_rope(rope)
        return bound.args[1:], bound.kwargs

    def later_block(module, args, kwargs):
        bound = _bind(module, args, kwargs)
        if bound.arguments["x"].shape[1] != sp.shard.local:
            raise ValueError("a block after the first got a sequence that is not this rank's slice")
        bound.arguments["rope"] = sp.local_rope(bound.arguments["rope"])
        return bound.args[1:], bound.kwargs

    def head(module, args, output):
        return sp.gather(output)

    sp._handles.append(model.register_forward_pre_hook(same_inputs, with_kwargs=True))
    sp._handles.append(model.blocks[0].register_forward_pre_hook(first_block, with_kwargs=True))
    for block in model.blocks[1:]:
        sp._handles.append(block.register_forward_pre_hook(later_block, with_kwargs=True))
    sp._handles.append(model.head.register_forward_hook(head))
    model._sequence_parallel = sp
    return sp
