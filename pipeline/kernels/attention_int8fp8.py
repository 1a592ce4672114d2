"""8-bit attention in Triton: INT8 Q.K^T and FP8 (e4m3) P.V, the SageAttention2 recipe, for Hopper.

    int8fp8_attention(q, k, v) -> out     q [B, Lq, H, D], k and v [B, Lk, H, D]; out [B, Lq, H, D] in v's dtype

Unmasked, scale 1/sqrt(D): the `attend` contract of pipeline.kernels.attention. Hopper's tensor cores
run 8-bit operands at twice the bf16 rate, and at 117 frames self-attention is over half of the DiT's
FLOPs, so this is where a forward's time goes (benchmarks/RESULTS.md).

How the 8 bits keep the error small (each step is exact algebra except the roundings named):
  - K smoothing: the key mean over tokens is subtracted from every key. Softmax is invariant to adding
    the same q.mean to every logit of a row, and the channel offsets that are common to all keys no
    longer eat into the 8-bit range.
  - Q in INT8 with one scale per token and head, K with one per block of BLOCK_N keys and head
    (max |x| / 127), so that a block's logits are its int32 dot products times one scale per query
    row: one FMA per logit to the exp2 argument. (Per-token K scales need a second FMA and registers
    for per-column scales; with them, and Q loaded by pointers, the kernel was 9% slower at 5.08%
    error against 5.12% on the benchmark's test.) The 1/sqrt(D) * log2(e) of the exp2 softmax is
    folded into Q's scale.
  - V smoothing: V's mean over tokens is subtracted and added back to the output (rows of P sum to 1),
    then V goes to FP8 with one scale per channel and head (max |v| / 448).
  - P, in [0, 1] after the online-softmax shift, is computed as 448 * exp2(...) (the shift absorbs the
    factor) so it fills e4m3's range, and each block's P.V is accumulated in a fresh fp32 tile that is
    then added to the running output in fp32: Hopper's FP8 MMA accumulates with reduced precision, so
    the hardware accumulator never spans more than BLOCK_N keys (SageAttention2's two-level
    accumulation).

The quantisation is plain torch (`quantise_inputs`), so inside a compiled block Inductor fuses it with
the RoPE that precedes it; the kernel itself is a custom op (`talkfarm::int8fp8_attention_core`) that
torch.compile treats as opaque. Keys are padded to a whole number of BLOCK_N with zeros and the padding
is masked to -inf in the last key block only.

Q, K and V are read through TMA descriptors (Hopper; a pointer load of Q alone cost ~450 bytes of
register spills per thread). The block sizes are fixed, chosen on the H100 at the 14B's shapes
(benchmarks/RESULTS.md: 58 ms, ~780 TFLOP/s at L=46,800 against cuDNN's 76 ms); there is no run-time
autotuning, so a run's kernels do not depend on timing noise. Error against fp32 attention: 5.1% on
random near-uniform attention (P and V in e4m3), about 1% at the DiT's velocity.
"""

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634

# Chosen on the H100 (benchmarks/bench_attention.py): 64 x 128 with 4 warps and 3 stages was the fastest
# of 18 configurations in every run (four, with the kernel as it is and as it was).
BLOCK_M = 64
BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 3

# tl.arange needs a power of two; > 256 would overflow MAGIC_BITS; Hopper's int8 dot needs K >= 32 (on
# an H200 a head dim of 16 fails to compile: "K >= 32"; Triton's interpreter on the CPU runs it anyway).
HEAD_DIMS = (32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------- kernel


# int32 -> fp32 without the I2F instruction (quarter rate on Hopper, as slow as exp2): for |x| < 2^22,
# the bits of x + 0x4B400000 are the float 1.5 * 2^23 + x. The Q.K^T sums stay below 127 * 127 * 256.
MAGIC_BITS = tl.constexpr(0x4B400000)
MAGIC_FLOAT = tl.constexpr(12582912.0)  # 1.5 * 2^23
LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_MAX))


@triton.jit
def _attend_block(acc, l_i, m_i, q, q_scale, k_desc, v_desc, KS, head_row, v_row, col, key_len,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Keys col..col+BLOCK_N of the head whose keys start at row head_row of K: one step of the online
    softmax. Returns the updated (acc, l_i, m_i)."""
    k = k_desc.load([head_row + col, 0])
    scale = q_scale * tl.load(KS + (head_row + col) // BLOCK_N)  # per query row: logit = (s - MAGIC) * scale
    s = (tl.dot(q, k.T) + MAGIC_BITS).to(tl.float32, bitcast=True)
    if MASK:
        s = tl.where((col + tl.arange(0, BLOCK_N))[None, :] < key_len, s, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(s, 1) - MAGIC_FLOAT) * scale)  # scale > 0
    # 448 * exp2(logit - max) in one FMA: P in [0, 448] fills e4m3's range.
    p = tl.math.exp2(s * scale[:, None] - (scale * MAGIC_FLOAT + m_new - LOG2_FP8_MAX)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v_desc.load([v_row, col])
    pv = tl.dot(p.to(tl.float8e4nv), v.T)  # a fresh fp32 tile: at most BLOCK_N keys in the MMA accumulator
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _int8fp8_attention_kernel(q_desc, QS, k_desc, KS, v_desc, VS, VM, O, query_len, key_len, full_blocks,
                              padded_key_len, heads,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              PARTIAL_BLOCK: tl.constexpr):
    """Q [B, Lq, H, D] int8 (TMA descriptor over [B*Lq, H*D]), QS [B, Lq, H]; K [B, H, Lkp, D] int8
    (descriptor over [B*H*Lkp, D]), KS [B, H, Lkp / BLOCK_N]; V [B, H, D, Lkp] fp8 (descriptor over
    [B*H*D, Lkp]); VS and VM [B, H, D] (V's scale and mean); O [B, Lq, H, D]. Grid (Lq / BLOCK_M, B * H).
    `full_blocks` key blocks hold only real keys; PARTIAL_BLOCK: one more holds the last key_len % BLOCK_N."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = heads * HEAD_DIM  # elements per token in Q and O
    in_range = offs_m < query_len

    # rows past this batch's queries are the next batch's (or TMA's zeros): computed, never stored
    q = q_desc.load([(b * query_len + start_m * BLOCK_M).to(tl.int32), (h * HEAD_DIM).to(tl.int32)])
    q_scale = tl.load(QS + (b * query_len + offs_m) * heads + h, mask=in_range, other=1.0)
    head_row = (bh * padded_key_len).to(tl.int32)  # this head's first row in K (and block in KS, / BLOCK_N)
    v_row = (bh * HEAD_DIM).to(tl.int32)  # and in V
    col = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for _ in range(0, full_blocks):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, q_scale, k_desc, v_desc, KS, head_row, v_row, col,
                                      key_len, BLOCK_N, False)
        col += BLOCK_N
    if PARTIAL_BLOCK:
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, q_scale, k_desc, v_desc, KS, head_row, v_row, col,
                                      key_len, BLOCK_N, True)

    channel = bh * HEAD_DIM + offs_d
    v_scale = tl.load(VS + channel)
    v_mean = tl.load(VM + channel)
    out = acc * (v_scale[None, :] / l_i[:, None]) + v_mean[None, :]
    o_ptrs = O + (b * query_len + offs_m[:, None]) * row + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_range[:, None])


# ---------------------------------------------------------------------------------------------- torch side


def _quantise(x: torch.Tensor, dims: tuple[int, ...], scale_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 values, fp32 scale times scale_factor), one scale per slice over `dims` (max |x| / 127).
    An all-zero slice gets the smallest positive scale (its values stay 0)."""
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    values = torch.round(x / scale).to(torch.int8)
    return values, scale * scale_factor


def quantise_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The kernel's inputs from q, k, v [B, L, H, D] (any float dtype): q8 [B, Lq, H, D] and q_scale
    [B, Lq, H] (one per token and head), k8 [B, H, Lkp, D] and k_scale [B, H, Lkp / BLOCK_N] (one per
    block of keys and head), v8 [B, H, D, Lkp] (the layout Hopper's FP8 MMA reads), v_scale and v_mean
    [B, H, D]; keys padded with zeros to Lkp, a multiple of BLOCK_N. q_scale carries the softmax's
    1/sqrt(D) * log2(e)."""
    batch, _, heads, head_dim = k.shape
    pad = -k.shape[1] % BLOCK_N
    q8, q_scale = _quantise(q.float(), (-1,), LOG2E / math.sqrt(head_dim))
    k = k.float()
    k = torch.nn.functional.pad((k - k.mean(dim=1, keepdim=True)).transpose(1, 2), (0, 0, 0, pad))
    k8, k_scale = _quantise(k.view(batch, heads, -1, BLOCK_N, head_dim), (-2, -1))
    v = v.float()
    v_mean = v.mean(dim=1, keepdim=True)
    v = v - v_mean
    v_scale = v.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    v8 = torch.nn.functional.pad((v / v_scale).permute(0, 2, 3, 1), (0, pad)).to(torch.float8_e4m3fn)
    return (q8, q_scale.squeeze(-1), k8.view(batch, heads, -1, head_dim), k_scale.flatten(2), v8,
            v_scale.squeeze(1), v_mean.squeeze(1))


@torch.library.custom_op("talkfarm::int8fp8_attention_core", mutates_args=())
def _attention_core(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                    v8: torch.Tensor, v_scale: torch.Tensor, v_mean: torch.Tensor, key_len: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
    batch, query_len, heads, head_dim = q8.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"int8fp8 attention supports head dims {', '.join(map(str, HEAD_DIMS))}, not {head_dim}")
    padded_key_len = k8.shape[2]
    if padded_key_len % BLOCK_N:
        raise ValueError(f"int8fp8 attention: keys padded to {padded_key_len}, not a multiple of BLOCK_N={BLOCK_N}")
    out = torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
    q_desc = TensorDescriptor.from_tensor(q8.contiguous().view(-1, heads * head_dim), [BLOCK_M, head_dim])
    k_desc = TensorDescriptor.from_tensor(k8.contiguous().view(-1, head_dim), [BLOCK_N, head_dim])
    v_desc = TensorDescriptor.from_tensor(v8.contiguous().view(-1, padded_key_len), [head_dim, BLOCK_N])
    grid = (triton.cdiv(query_len, BLOCK_M), batch * heads)
    _int8fp8_attention_kernel[grid](
        q_desc, q_scale.contiguous(), k_desc, k_scale.contiguous(), v_desc, v_scale.contiguous(),
        v_mean.contiguous(), out, query_len, key_len, key_len // BLOCK_N, padded_key_len, heads,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL_BLOCK=key_len % BLOCK_N != 0,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


@_attention_core.register_fake
def _(q8, q_scale, k8, k_scale, v8, v_scale, v_mean, key_len, out_dtype):
    return q8.new_empty(q8.shape, dtype=out_dtype)


def int8fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v with INT8 Q.K^T and FP8 P.V; q, k, v [B, L, H, D]; out in v's dtype."""
    return _attention_core(*quantise_inputs(q, k, v), k.shape[1], v.dtype)
