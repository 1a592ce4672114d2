"""The DiT against independent computations: official key names, audio windowing, per-frame audio
attention, RoPE in float64, L-RoPE positions, and the forward's shape and determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.dit import AudioCrossAttention, AudioProjection, DiTConfig, WanInfiniteTalkDiT, rope_3d_tables, rotate_pairs

CFG = DiTConfig(
    dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=24, clip_dim=20, text_len=16, freq_dim=32,
    audio_dim=12, audio_layers=3, audio_hidden=20, audio_tokens=4,
)


def official_key_names(cfg: DiTConfig) -> set[str]:
    """The official Wan2.1 I2V + InfiniteTalk state-dict names, written out by hand from the official
    modules' attribute names (Wan2.1 wan/modules/model.py, InfiniteTalk wan/modules/multitalk_model.py),
    not from our modules."""
    wb = ("weight", "bias")
    keys = {f"patch_embedding.{p}" for p in wb}
    keys |= {f"text_embedding.{i}.{p}" for i in (0, 2) for p in wb}
    keys |= {f"time_embedding.{i}.{p}" for i in (0, 2) for p in wb}
    keys |= {f"time_projection.1.{p}" for p in wb}
    keys |= {f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in wb}
    keys |= {"head.modulation"} | {f"head.head.{p}" for p in wb}
    keys |= {f"audio_proj.{m}.{p}" for m in ("proj1", "proj1_vf", "proj2", "proj3", "norm") for p in wb}
    for n in range(cfg.num_layers):
        b = f"blocks.{n}"
        keys.add(f"{b}.modulation")
        keys |= {f"{b}.self_attn.{m}.{p}" for m in "qkvo" for p in wb}
        keys |= {f"{b}.self_attn.norm_{m}.weight" for m in "qk"}
        keys |= {f"{b}.norm3.{p}" for p in wb}
        keys |= {f"{b}.cross_attn.{m}.{p}" for m in ("q", "k", "v", "o", "k_img", "v_img") for p in wb}
        keys |= {f"{b}.cross_attn.{m}.weight" for m in ("norm_q", "norm_k", "norm_k_img")}
        keys |= {f"{b}.ffn.{i}.{p}" for i in (0, 2) for p in wb}
        keys |= {f"{b}.norm_x.{p}" for p in wb}
        keys |= {f"{b}.audio_cross_attn.{m}.{p}" for m in ("q_linear", "kv_linear", "proj") for p in wb}
    return keys


def random_model(cfg=CFG, seed=0) -> WanInfiniteTalkDiT:
    torch.manual_seed(seed)
    model = WanInfiniteTalkDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_state_dict_names_are_the_official_ones():
    model = WanInfiniteTalkDiT(CFG)
    assert set(model.state_dict()) == official_key_names(CFG)


def test_official_shapes_at_14b():
    with torch.device("meta"):
        model = WanInfiniteTalkDiT(DiTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert shapes["blocks.0.modulation"] == (1, 6, 5120)
    assert shapes["blocks.39.audio_cross_attn.kv_linear.weight"] == (10240, 768)
    assert shapes["audio_proj.proj1.weight"] == (512, 5 * 12 * 768)
    assert shapes["audio_proj.proj1_vf.weight"] == (512, 8 * 12 * 768)
    assert shapes["audio_proj.proj3.weight"] == (32 * 768, 512)
    assert shapes["head.head.weight"] == (64, 5120)
    dit = sum(v.numel() for k, v in model.state_dict().items() if "audio" not in k and "norm_x" not in k)
    audio = sum(v.numel() for k, v in model.state_dict().items() if "audio" in k or "norm_x" in k)
    assert 16.3e9 < dit < 16.5e9 and 2.4e9 < audio < 2.6e9  # the sizes the reference doc gives


def test_audio_projection_windowing_equals_a_naive_loop():
    torch.manual_seed(1)
    proj = AudioProjection(CFG).double()
    frames = 13  # 4 latent frames
    audio = torch.randn(2, frames, 5, CFG.audio_layers, CFG.audio_dim, dtype=torch.float64)
    got = proj(audio)

    def mlp(x, first):
        x = F.relu((proj.proj1 if first else proj.proj1_vf)(x.flatten()))
        x = proj.proj3(F.relu(proj.proj2(x))).view(CFG.audio_tokens, CFG.audio_dim)
        return F.layer_norm(x, (CFG.audio_dim,), proj.norm.weight, proj.norm.bias, 1e-5)

    for b in range(2):
        # latent frame 0: video frame 0 with offsets -2..+2
        torch.testing.assert_close(got[b, 0], mlp(audio[b, 0], True), rtol=1e-6, atol=1e-6)
        for lat in range(1, 4):
            v0 = 1 + 4 * (lat - 1)  # first of the 4 video frames of this latent frame
            rows = [audio[b, v0, o] for o in (0, 1, 2)]  # offsets -2, -1, 0
            rows += [audio[b, v0 + 1, 2], audio[b, v0 + 2, 2]]  # offset 0
            rows += [audio[b, v0 + 3, o] for o in (2, 3, 4)]  # offsets 0, +1, +2
            torch.testing.assert_close(got[b, lat], mlp(torch.stack(rows), False), rtol=1e-6, atol=1e-6)


def test_one_speaker_audio_attention_is_per_frame():
    torch.manual_seed(2)
    attn = AudioCrossAttention(CFG.dim, CFG.audio_dim, CFG.num_heads).double()
    frames, per_frame, tokens = 3, 10, 4
    x = torch.randn(2, frames * per_frame, CFG.dim, dtype=torch.float64)
    audio = torch.randn(2, frames, tokens, CFG.audio_dim, dtype=torch.float64)
    got = attn(x, audio, frames)
    hd = CFG.dim // CFG.num_heads
    for b in range(2):
        for f in range(frames):
            xs = x[b, f * per_frame : (f + 1) * per_frame]
            q = attn.q_linear(xs).view(per_frame, CFG.num_heads, hd).transpose(0, 1)
            k, v = attn.kv_linear(audio[b, f]).view(tokens, 2, CFG.num_heads, hd).unbind(1)
            w = torch.softmax(q @ k.transpose(0, 1).transpose(1, 2) / math.sqrt(hd), dim=-1)
            out = (w @ v.transpose(0, 1)).transpose(0, 1).reshape(per_frame, CFG.dim)
            torch.testing.assert_close(got[b, f * per_frame : (f + 1) * per_frame], attn.proj(out))


def test_the_rope_tables_kept_between_forwards_are_two_whatever_lengths_a_run_has():
    """A run's windows have many lengths (every job's last window is shorter); each table held on the
    GPU would add to its memory job after job, so only the full window's and the latest are kept."""
    rope_3d_tables.cache_clear()
    full = (30, 6, 8)
    for frames in (30, 9, 30, 13, 30, 19, 30, 4):
        rope_3d_tables((frames, 6, 8), 16, torch.device("cpu"))
    assert rope_3d_tables.cache_info().currsize == 2
    hits = rope_3d_tables.cache_info().hits
    rope_3d_tables(full, 16, torch.device("cpu"))
    rope_3d_tables((4, 6, 8), 16, torch.device("cpu"))
    assert rope_3d_tables.cache_info().hits == hits + 2  # the full window's table was never dropped


def test_rope_3d_equals_float64_complex_reference():
    grid, head_dim = (3, 4, 5), 16
    x = torch.randn(2, math.prod(grid), 3, head_dim)
    cos, sin = rope_3d_tables(grid, head_dim, torch.device("cpu"))
    got = rotate_pairs(x, cos, sin)

    # Reference: per token, complex multiply each pair by exp(i * pos * theta^(-2j/d_part)) in float64.
    c = head_dim // 2
    parts = (c - 2 * (c // 3), c // 3, c // 3)
    want = torch.empty(x.shape, dtype=torch.float64)
    token = 0
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                angles = []
                for pos, size in zip((f, h, w), parts):
                    angles += [pos * 10000.0 ** (-2 * j / (2 * size)) for j in range(size)]
                rot = torch.polar(torch.ones(c, dtype=torch.float64), torch.tensor(angles, dtype=torch.float64))
                pairs = torch.view_as_complex(x[:, token].double().reshape(2, 3, c, 2).contiguous())
                want[:, token] = torch.view_as_real(pairs * rot).reshape(2, 3, head_dim)
                token += 1
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_lrope_positions_follow_the_reference_map():
    attn = AudioCrossAttention(CFG.dim, CFG.audio_dim, CFG.num_heads)
    # token 0 most on speaker 1, token 1 on speaker 2, token 2 on the background
    ref_map = torch.tensor([[[0.9, 0.1, 0.2], [0.2, 0.8, 0.1], [0.1, 0.3, 0.95]]])
    pos = attn.token_positions(ref_map)[0]
    # speaker 1 row spans [0.1, 0.9] -> [0, 4]; speaker 2 row spans [0.1, 0.8] -> [20, 24]
    torch.testing.assert_close(pos, torch.tensor([4.0, 24.0, 12.0]), atol=1e-5, rtol=0)


def inputs(cfg=CFG, speakers=1, frames=2, h=4, w=6, batch=1):
    g = torch.Generator().manual_seed(3)
    t = 4 * (frames - 1) + 1
    return dict(
        x=torch.randn(batch, 16, frames, h, w, generator=g),
        t=torch.full((batch,), 700.0),
        text=torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
        clip_tokens=torch.randn(batch, 257, cfg.clip_dim, generator=g),
        y=torch.randn(batch, 20, frames, h, w, generator=g),
        audio=torch.randn(batch, speakers, t, 5, cfg.audio_layers, cfg.audio_dim, generator=g),
    )


def test_forward_is_deterministic_and_batch_independent():
    model = random_model()
    one = inputs(batch=1)
    two = inputs(batch=2)
    with torch.no_grad():
        a = model(**one)
        b = model(**one)
        both = model(**two)
        first = model(**{k: v[:1] for k, v in two.items()})
    assert a.shape == (1, 16, 2, 4, 6) and a.dtype == torch.float32
    assert torch.equal(a, b)
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


def test_two_speakers_need_masks_and_use_them():
    model = random_model()
    args = inputs(speakers=2)
    with pytest.raises(ValueError, match="ref_masks"):
        model(**args)
    left = torch.zeros(3, 8, 12)
    left[0, :, :6], left[1, :, 6:] = 1, 1
    swapped = left[[1, 0, 2]]
    with torch.no_grad():
        a = model(**args, ref_masks=left)
        b = model(**args, ref_masks=swapped)
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # the masks steer which voice a region hears


def test_bf16_keeps_norms_and_modulation_in_fp32():
    from pipeline.models.dit import keeps_fp32

    model = random_model()
    for name, p in model.named_parameters():
        if not keeps_fp32(name):
            p.data = p.data.bfloat16()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.modulation"] == torch.float32
    assert dtypes["blocks.0.self_attn.norm_q.weight"] == torch.float32
    assert dtypes["blocks.0.norm_x.weight"] == torch.float32
    assert dtypes["head.head.weight"] == torch.float32
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["audio_proj.proj1.weight"] == torch.bfloat16
    reference = random_model()
    with torch.no_grad():
        low, high = model(**inputs()), reference(**inputs())
    rel = (low - high).norm() / high.norm()
    assert rel < 0.05, rel


def naive_official_forward(sd: dict, cfg: DiTConfig, x, t, text, clip_tokens, y, audio):
    """The official single-speaker forward written out from the formulas (float64, loops over
    tokens where it helps), reading the state dict by official names. Batch of one."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda name, v: v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    ln = lambda v, name=None, eps=cfg.eps: F.layer_norm(  # noqa: E731
        v, v.shape[-1:], sd.get(f"{name}.weight") if name else None, sd.get(f"{name}.bias") if name else None, eps
    )
    rms = lambda v, name: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.eps) * sd[f"{name}.weight"]  # noqa: E731
    gelu = lambda v: F.gelu(v, approximate="tanh")  # noqa: E731
    heads, hd = cfg.num_heads, cfg.head_dim

    def attend(q, k, v):  # [Lq, D], [Lk, D] -> [Lq, D], heads split
        q, k, v = (u.view(u.shape[0], heads, hd).transpose(0, 1) for u in (q, k, v))
        return (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v).transpose(0, 1).reshape(-1, cfg.dim)

    # patchify: every 1x2x2 patch of the 36-channel input is one token, frame-major
    inp = torch.cat([x, y], 1)[0].double()  # [36, F, H, W]
    f, h, w = inp.shape[1], inp.shape[2] // 2, inp.shape[3] // 2
    wconv = sd["patch_embedding.weight"].flatten(1)  # [D, 36*1*2*2]
    tokens = []
    for fi in range(f):
        for hi in range(h):
            for wi in range(w):
                patch = inp[:, fi, 2 * hi : 2 * hi + 2, 2 * wi : 2 * wi + 2].reshape(-1)
                tokens.append(wconv @ patch + sd["patch_embedding.bias"])
    hs = torch.stack(tokens)  # [L, D]

    # 3D RoPE as complex rotation of adjacent pairs
    c = hd // 2
    parts = (c - 2 * (c // 3), c // 3, c // 3)
    rot = []
    for fi in range(f):
        for hi in range(h):
            for wi in range(w):
                ang = [p * 10000.0 ** (-2 * j / (2 * s)) for p, s in zip((fi, hi, wi), parts) for j in range(s)]
                rot.append(torch.polar(torch.ones(c, dtype=torch.float64), torch.tensor(ang, dtype=torch.float64)))
    rot = torch.stack(rot)[:, None]  # [L, 1, c]
    rope = lambda u: torch.view_as_real(torch.view_as_complex(u.view(-1, heads, c, 2)) * rot).reshape(-1, cfg.dim)  # noqa: E731

    half = cfg.freq_dim // 2
    ang = t.double()[0] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", torch.cat([ang.cos(), ang.sin()]))))
    e6 = lin("time_projection.1", F.silu(e)).view(6, cfg.dim)

    ctx_text = lin("text_embedding.2", gelu(lin("text_embedding.0", text[0].double())))
    ci = ln(clip_tokens[0].double(), "img_emb.proj.0", 1e-5)
    ctx_img = ln(lin("img_emb.proj.3", F.gelu(lin("img_emb.proj.1", ci))), "img_emb.proj.4", 1e-5)

    # audio tokens per latent frame
    a = audio[0, 0].double()  # [T, 5, layers, C]
    def audio_mlp(rows, proj1):
        u = torch.relu(lin(f"audio_proj.{proj1}", rows.reshape(-1)))
        u = lin("audio_proj.proj3", torch.relu(lin("audio_proj.proj2", u))).view(cfg.audio_tokens, cfg.audio_dim)
        return ln(u, "audio_proj.norm", 1e-5)
    audio_tok = [audio_mlp(a[0], "proj1")]
    for lat in range(1, f):
        v0 = 1 + 4 * (lat - 1)
        rows = [a[v0, 0], a[v0, 1], a[v0, 2], a[v0 + 1, 2], a[v0 + 2, 2], a[v0 + 3, 2], a[v0 + 3, 3], a[v0 + 3, 4]]
        audio_tok.append(audio_mlp(torch.stack(rows), "proj1_vf"))

    per_frame = h * w
    for n in range(cfg.num_layers):
        b = f"blocks.{n}"
        mod = sd[f"{b}.modulation"][0] + e6  # shift, scale, gate (attention); shift, scale, gate (ffn)
        u = ln(hs) * (1 + mod[1]) + mod[0]
        q = rope(rms(lin(f"{b}.self_attn.q", u), f"{b}.self_attn.norm_q"))
        k = rope(rms(lin(f"{b}.self_attn.k", u), f"{b}.self_attn.norm_k"))
        hs = hs + lin(f"{b}.self_attn.o", attend(q, k, lin(f"{b}.self_attn.v", u))) * mod[2]

        u = ln(hs, f"{b}.norm3")
        q = rms(lin(f"{b}.cross_attn.q", u), f"{b}.cross_attn.norm_q")
        txt = attend(q, rms(lin(f"{b}.cross_attn.k", ctx_text), f"{b}.cross_attn.norm_k"), lin(f"{b}.cross_attn.v", ctx_text))
        img = attend(q, rms(lin(f"{b}.cross_attn.k_img", ctx_img), f"{b}.cross_attn.norm_k_img"), lin(f"{b}.cross_attn.v_img", ctx_img))
        hs = hs + lin(f"{b}.cross_attn.o", txt + img)

        u = ln(hs, f"{b}.norm_x")
        out = []
        for fi in range(f):
            rows = u[fi * per_frame : (fi + 1) * per_frame]
            kv = lin(f"{b}.audio_cross_attn.kv_linear", audio_tok[fi]).view(-1, 2, cfg.dim)
            out.append(attend(lin(f"{b}.audio_cross_attn.q_linear", rows), kv[:, 0], kv[:, 1]))
        hs = hs + lin(f"{b}.audio_cross_attn.proj", torch.cat(out))

        u = ln(hs) * (1 + mod[4]) + mod[3]
        hs = hs + lin(f"{b}.ffn.2", gelu(lin(f"{b}.ffn.0", u))) * mod[5]

    hm = sd["head.modulation"][0] + e
    out = lin("head.head", ln(hs) * (1 + hm[1]) + hm[0])  # [L, 16*4], per token (p, q, r, c) order
    video = torch.zeros(cfg.out_dim, f, 2 * h, 2 * w, dtype=torch.float64)
    for i, (fi, hi, wi) in enumerate((a, b_, c_) for a in range(f) for b_ in range(h) for c_ in range(w)):
        patch = out[i].view(1, 2, 2, cfg.out_dim)
        video[:, fi, 2 * hi : 2 * hi + 2, 2 * wi : 2 * wi + 2] = patch[0].permute(2, 0, 1)
    return video[None]


def test_forward_equals_the_official_formulas_in_float64():
    model = random_model().double()
    args = inputs()
    with torch.no_grad():
        got = model(**{k: v.double() for k, v in args.items()})
        want = naive_official_forward(model.state_dict(), CFG, **args)
    # our fp32 norms/RoPE sit inside a float64 model here, hence not 1e-12
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)  # seen: 2e-6
