"""Ulysses sequence parallelism (pipeline/parallel.py) on CPU: two gloo processes give what one gives.

One spawn of 2 processes does all the distributed checks (start-up is most of the cost) and writes each
rank's findings to a JSON file; the tests below read them. Every rank checks its own, whole, output.
Shapes are chosen so that the slice boundary falls inside a latent frame, and one so that the sequence
length is odd (padding). Tolerance: relative L2 error 1e-5 in fp32 (measured: ~1e-7; the differences
are summation order only).
"""

import json
import math
import os
import socket
import traceback
import wave
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from pipeline.job import Job, RenderSettings
from pipeline.kernels.compile import compile_blocks
from pipeline.models.checkpoints import Precision, load_models
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.parallel import Shard, apply_sequence_parallel
from pipeline.render import encode_job, render_windows

WORLD = 2
REL_TOL = 1e-5
SETTINGS = RenderSettings(window=33, motion=9, steps=2, size="64x64")  # 1 window, 3 guidance passes

# name: (batch, latent frames, latent height, latent width, speakers). Tokens per frame = (h/2)*(w/2).
CASES = {
    # 3 frames x 4 tokens = 12 tokens: rank 0 holds [0, 6), rank 1 [6, 12); frame 1 = [4, 8) is split
    "one_speaker": (2, 3, 4, 4, 1),
    # 3 frames x 9 tokens = 27 (odd): padded to 28, slices [0, 14) and [14, 27) + 1 padding token;
    # frame 1 = [9, 18) is split; two speakers: reference map, L-RoPE, global min/max
    "two_speakers": (2, 3, 6, 6, 2),
    # one speaker with the padding too
    "one_speaker_padded": (1, 3, 6, 6, 1),
}


def _inputs(cfg: DiTConfig, batch, frames, h, w, speakers, seed=0):
    g = torch.Generator().manual_seed(seed)
    video_frames = 4 * (frames - 1) + 1
    masks = None
    if speakers == 2:  # speaker 1 left, speaker 2 right, background the top row
        masks = torch.zeros(3, h, w)
        masks[0, 1:, : w // 2] = 1
        masks[1, 1:, w // 2 :] = 1
        masks[2, 0] = 1
    return dict(
        x=torch.randn(batch, 16, frames, h, w, generator=g),
        t=torch.tensor([500.0, 250.0][:batch]),
        text=torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
        clip_tokens=torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g),
        y=torch.randn(batch, 20, frames, h, w, generator=g),
        audio=torch.randn(batch, speakers, video_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_masks=masks,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _worker(rank: int, port: int, root: str, face: str, speech: str, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    found: dict = {}
    try:
        fp32 = Precision(dit="fp32", t5="fp32", clip="fp32", vae="fp32")
        models = load_models(write_tiny_checkpoints(root), fp32)
        dit = models.dit

        # -- DiT forward: the plain model first, then the same inputs through 2 ranks
        inputs = {name: _inputs(dit.cfg, *case) for name, case in CASES.items()}
        with torch.no_grad():
            single = {name: dit(**inp) for name, inp in inputs.items()}
            sp = apply_sequence_parallel(dit)
            for name, inp in inputs.items():
                par = dit(**inp)
                shard = sp.shard
                found[name] = {
                    "rel_err": _rel(par, single[name]), "max_abs": (par - single[name]).abs().max().item(),
                    "shape_equal": list(par.shape) == list(single[name].shape),
                    "tokens": shard.tokens, "per_frame": shard.per_frame, "start": shard.start, "stop": shard.stop,
                    "local": shard.local,
                }

            # -- ranks called with different inputs: every rank computes with rank 0's
            diverged = {k: v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() and rank else v
                        for k, v in inputs["one_speaker"].items()}
            found["diverged_inputs_rel_err"] = _rel(dit(**diverged), single["one_speaker"])

            # -- frame 0's keys when a slice is shorter than a frame (frame 0 spread over both ranks)
            for tokens, frames in ((10, 1), (12, 3)):
                full = torch.arange(2 * tokens * 2 * 3, dtype=torch.float32).view(2, tokens, 2, 3)
                sp.begin(tokens, frames)
                got = sp.frame0_keys(sp.split(full), tokens // frames)
                found[f"frame0_keys_{tokens}_{frames}"] = bool(torch.equal(got, full[:, : tokens // frames]))
            # a slice has the strides of a fresh tensor, batch of one included (compiled blocks guard on them)
            one = sp.split(torch.randn(1, 12, 2, 3))
            found["split_strides"] = [list(one.stride()), list(torch.empty(one.shape).stride())]

            # -- one window through pipeline.render, plain and on 2 ranks
            sp.remove()
            job = Job("sp", (speech,), image=face, seed=11)
            job_inputs = encode_job(models, job, SETTINGS)
            work = Path(out) / f"work-{rank}"
            plain = [r.frames for r in render_windows(models, job, job_inputs, SETTINGS, work / "plain", keep_frames=True)]
            sp = apply_sequence_parallel(dit)
            parallel = [r.frames for r in render_windows(models, job, job_inputs, SETTINGS, work / "parallel",
                                                         keep_frames=True)]
            found["render"] = {
                "windows": len(plain), "frames": list(plain[0].shape),
                "rel_err": _rel(parallel[0], plain[0]), "max_abs": (parallel[0] - plain[0]).abs().max().item(),
                "tokens": sp.shard.tokens, "per_frame": sp.shard.per_frame, "local": sp.shard.local,
            }
            sp.remove()

            # -- compiled blocks, then sequence parallelism: the order the renderer applies them in
            compiled = compile_blocks(dit)
            sp = apply_sequence_parallel(dit)
            par = dit(**inputs["two_speakers"])
            found["compiled"] = {"rel_err": _rel(par, single["two_speakers"]), "shapes": len(compiled.shapes)}
            sp.remove()

        # -- head count not divisible by G
        odd = WanInfiniteTalkDiT(DiTConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=1, text_dim=16, clip_dim=16,
                                           text_len=8, freq_dim=16, audio_dim=16, audio_layers=2, audio_hidden=16,
                                           audio_tokens=4))
        try:
            apply_sequence_parallel(odd)
            found["heads"] = "no error"
        except ValueError as exc:
            found["heads"] = f"ValueError: {exc}"
    except Exception:
        found["error"] = traceback.format_exc()
        raise
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(found, indent=1))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_speech(path: Path, seconds: float = 1.32, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((tone * 32767).astype("<i2").tobytes())
    return str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoints(root)
    out = tmp_path_factory.mktemp("sp")
    face = out / "face.png"
    yy, xx = np.mgrid[0:96, 0:96]
    Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)).save(face)
    speech = _write_speech(out / "speech.wav")
    mp.spawn(_worker, args=(_free_port(), str(root), str(face), speech, str(out)), nprocs=WORLD)
    found = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    print(json.dumps(found, indent=1))
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_on_two_ranks_equals_one_process(ranks, case):
    _, frames, h, w, _ = CASES[case]
    per_frame = (h // 2) * (w // 2)
    for rank, found in enumerate(ranks):
        r = found[case]
        assert r["shape_equal"]
        assert r["rel_err"] < REL_TOL, (rank, r)
        assert r["tokens"] == frames * per_frame and r["per_frame"] == per_frame
        assert r["local"] == math.ceil(r["tokens"] / WORLD)
    # the slice boundary is inside a latent frame
    boundary = ranks[1][case]["start"]
    assert boundary % per_frame != 0, boundary
    if case != "one_speaker":
        assert ranks[1][case]["stop"] - ranks[1][case]["start"] < ranks[1][case]["local"]  # padding on rank 1


def test_every_rank_computes_with_the_first_ranks_inputs(ranks):
    """Rank 1 passes other inputs (every float tensor + 1): both get rank 0's forward."""
    for found in ranks:
        assert found["diverged_inputs_rel_err"] < REL_TOL


def test_frame0_keys_come_from_the_ranks_that_hold_them(ranks):
    for found in ranks:
        assert found["frame0_keys_10_1"]  # 5 tokens per rank, frame 0 is 10 tokens: both ranks send
        assert found["frame0_keys_12_3"]  # 6 per rank, frame 0 is 4 tokens: rank 0 alone


def test_slices_have_fresh_strides(ranks):
    for found in ranks:
        got, fresh = found["split_strides"]
        assert got == fresh


def test_window_rendered_on_two_ranks_equals_one_process(ranks):
    for found in ranks:
        r = found["render"]
        assert r["windows"] == 1 and r["frames"] == [33, 3, 64, 64]
        assert r["tokens"] == 9 * 16 and r["local"] == 72 and r["local"] % r["per_frame"] != 0  # 4.5 frames
        assert r["rel_err"] < REL_TOL, r
        assert r["max_abs"] < 1e-4, r


def test_compiled_blocks_on_two_ranks_equal_one_eager_process(ranks):
    """memory presets compile the blocks; sequence parallelism then swaps the attention modules'
    classes inside the compiled forward (its all-to-alls are traced or run between graphs)."""
    for found in ranks:
        assert found["compiled"]["shapes"] >= 1
        assert found["compiled"]["rel_err"] < 1e-4, found["compiled"]


def test_heads_not_divisible_by_ranks_is_refused(ranks):
    for found in ranks:
        assert found["heads"].startswith("ValueError"), found["heads"]
        assert "3 heads" in found["heads"] and "G = 2" in found["heads"]


def test_shard_arithmetic():
    shards = [Shard(tokens=27, per_frame=9, ranks=4, rank=r) for r in range(4)]
    assert [s.local for s in shards] == [7] * 4 and shards[0].padded == 28
    assert [(s.start, s.stop, s.real) for s in shards] == [(0, 7, 7), (7, 14, 7), (14, 21, 7), (21, 27, 6)]


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        with torch.device("meta"):
            model = WanInfiniteTalkDiT(DiTConfig(dim=32, num_heads=2, num_layers=1, ffn_dim=32))
        apply_sequence_parallel(model)
