"""Memory and speed settings on the CPU: compiled blocks against eager ones on the tiny DiT (one graph for
all blocks, hooks kept eager, a start-up error where compile cannot run); block offload refused
without CUDA, and its schedule checked with CUDA's stream, event and registration calls stubbed; the
memory presets compose, validate and reach the actors' settings. GPU numbers: benchmarks/RESULTS.md."""

import contextlib
import gc

import pytest
import torch
from hydra import compose, initialize_config_module
from torch._dynamo.utils import counters

import pipeline.kernels.compile as compile_mod
import pipeline.kernels.offload as offload_mod
from farm.config import ConfigError, memory_settings, model_spec, precision, validate
from pipeline.assemble import MemorySettings, ModelSpec, build_renderer
from pipeline.kernels import KernelUnavailable
from pipeline.kernels.compile import compile_blocks, compile_problem
from pipeline.models.vae_stream import decode_chunk, encode_chunk
from pipeline.kernels.fp8 import FP8, Fp8Linear, apply_fp8
from pipeline.kernels.offload import offload_blocks
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.models.vae import VAETiling

CFG = DiTConfig(
    dim=64, ffn_dim=96, num_heads=4, num_layers=3, text_dim=24, clip_dim=20, text_len=16, freq_dim=32,
    audio_dim=16, audio_layers=3, audio_hidden=32, audio_tokens=4,
)
ONE_JOB = ("job.audio=speech.wav", "job.image=face.png")
CAN_COMPILE = compile_problem("cpu") is None


def random_model(seed=0) -> WanInfiniteTalkDiT:
    torch.manual_seed(seed)
    model = WanInfiniteTalkDiT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval().requires_grad_(False)


def inputs(frames=2, h=4, w=6):
    g = torch.Generator().manual_seed(3)
    return dict(
        x=torch.randn(1, 16, frames, h, w, generator=g),
        t=torch.full((1,), 700.0),
        text=torch.randn(1, CFG.text_len, CFG.text_dim, generator=g),
        clip_tokens=torch.randn(1, 257, CFG.clip_dim, generator=g),
        y=torch.randn(1, 20, frames, h, w, generator=g),
        audio=torch.randn(1, 1, 4 * (frames - 1) + 1, 5, CFG.audio_layers, CFG.audio_dim, generator=g),
    )


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- compile


@pytest.fixture(scope="module")
def compiled():
    """The tiny DiT's outputs eager, then compiled at two shapes, with the number of graphs each call made."""
    model = random_model()
    with torch.no_grad():
        eager = {frames: model(**inputs(frames)) for frames in (2, 3)}
        state = compile_blocks(model)
        graphs = []
        outputs = []
        for frames in (2, 2, 3):
            before = counters["stats"]["unique_graphs"]
            outputs.append(model(**inputs(frames)))
            graphs.append(counters["stats"]["unique_graphs"] - before)
    return model, state, eager, outputs, graphs


@pytest.mark.skipif(not CAN_COMPILE, reason=f"torch.compile cannot run on this CPU: {compile_problem('cpu')}")
def test_compiled_blocks_match_eager(compiled):
    _, _, eager, (first, again, longer), _ = compiled
    assert rel(first, eager[2]) < 1e-5 and rel(longer, eager[3]) < 1e-5
    assert torch.equal(first, again)


@pytest.mark.skipif(not CAN_COMPILE, reason=f"torch.compile cannot run on this CPU: {compile_problem('cpu')}")
def test_one_graph_for_all_blocks_and_one_per_shape(compiled):
    model, state, _, _, graphs = compiled
    assert len(model.blocks) == 3
    assert graphs == [1, 0, 1]  # the first shape: one graph for the 3 blocks; the same again: none; a new length: one
    assert state.blocks == 3 and len(state.shapes) == 2  # both shapes logged, with their compile times
    assert all(seconds > 0 for seconds in state.shapes.values())


@pytest.mark.skipif(not CAN_COMPILE, reason=f"torch.compile cannot run on this CPU: {compile_problem('cpu')}")
def test_block_hooks_stay_eager(compiled):
    model = compiled[0]
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(**inputs(2))
            model(**inputs(2))
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="already replaced"):
        compile_blocks(model)


@pytest.mark.skipif(not CAN_COMPILE, reason=f"torch.compile cannot run on this CPU: {compile_problem('cpu')}")
def test_shorter_windows_share_one_dynamic_graph_and_full_windows_keep_their_own(caplog):
    model = random_model()
    lengths = (4, 2, 3, 4, 5, 2, 4)  # latent frames: 4 is the full window, the others a job's last or only one
    with torch.no_grad():
        eager = {frames: model(**inputs(frames)) for frames in set(lengths)}
        state = compile_blocks(model, full_frames=4)
        graphs, outputs = [], []
        with caplog.at_level("INFO", logger="pipeline.kernels.compile"):
            for frames in lengths:
                before = counters["stats"]["unique_graphs"]
                outputs.append(model(**inputs(frames)))
                graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 1, 0, 0, 0, 0, 0]  # the full window's graph, then one for every other length
    assert [key[0] for key in state.shapes] == ["static", "any length"]
    assert sum("compiled DiT blocks in" in r.message for r in caplog.records) == 2
    for frames, out in zip(lengths, outputs):
        assert rel(out, eager[frames]) < 1e-5, frames


def test_compile_that_cannot_run_is_a_start_up_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(compile_mod.torch, "compile", broken)
    problem = compile_mod._compile_problem.__wrapped__("cpu")  # the probe itself, not its cached answer
    assert problem.startswith("torch.compile failed on a probe function (RuntimeError: InvalidCxxCompiler")
    monkeypatch.setattr(compile_mod, "compile_problem", lambda device: problem)
    model = random_model()
    with pytest.raises(KernelUnavailable, match=r"^torch\.compile \(DiT blocks, VAE\) cannot run on cpu: torch"):
        compile_blocks(model)
    assert not any("forward" in vars(b) for b in model.blocks)  # nothing changed


# ---------------------------------------------------------------------------------------------- offload


def test_offload_without_cuda_is_a_clear_error():
    model = random_model()
    before = {n: t.data_ptr() for n, t in model.state_dict().items()}
    with pytest.raises(KernelUnavailable, match=r"^block offload cannot run on cpu: it streams weights to a CUDA GPU"):
        offload_blocks(model, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(KernelUnavailable, match=r"^block offload cannot run on cuda: CUDA is not available"):
            offload_blocks(model, "cuda")
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == before  # nothing moved


@pytest.fixture
def stubbed_cuda(monkeypatch):
    """offload_blocks on the CPU with its CUDA calls recorded instead of made: the packing, the hooks and
    the schedule run as on a GPU; only the copies are synchronous."""
    calls = []

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            calls.append("wait_stream")

        def wait_event(self, event):
            calls.append("wait_event")

    class Event:
        def record(self, stream=None):
            calls.append("record")

    class Cudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append("unregister")
            return 0

    cuda = offload_mod.torch.cuda
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "Event", Event)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "cudart", lambda: Cudart())
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(offload_mod, "check_offload", lambda device: None)
    return calls


def held_once_in_host_buffer(block, weights, quant) -> bool:
    tensors = list(block.parameters()) + list(block.buffers())
    if quant and not any(isinstance(m, Fp8Linear) and m.weight.dtype == FP8 for m in block.modules()):
        return False
    return ({t.untyped_storage().data_ptr() for t in tensors} == {weights.host.untyped_storage().data_ptr()}
            and sum(t.numel() * t.element_size() for t in tensors) <= weights.nbytes)


@pytest.mark.parametrize("quant", [None, "fp8_weights"])
@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_offload_schedule_with_cuda_stubbed(stubbed_cuda, quant, ahead):
    model = random_model()
    if quant:
        apply_fp8(model, quant, "cpu")
    with torch.no_grad():
        reference = model(**inputs())
    state = offload_blocks(model, "cpu", ahead)

    # at rest: each block's tensors (fp8 weights, scales and biases too) are views of its one host buffer
    registered = [c[1] for c in stubbed_cuda if isinstance(c, tuple)]
    assert len(registered) == len(model.blocks) and sum(registered) == state.host_bytes
    assert all(held_once_in_host_buffer(b, w, quant) for b, w in zip(model.blocks, state.weights))

    # in use: block i runs on its own copy, with at most `ahead` more in flight
    seen, in_flight = [], state.in_flight

    def spy(module, args, i):
        storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen.append((i, sorted(in_flight), storages == {in_flight[i][0].untyped_storage().data_ptr()}))

    handles = [b.register_forward_pre_hook(lambda m, a, i=i: spy(m, a, i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        out = model(**inputs())
        again = model(**inputs())
    for h in handles:
        h.remove()
    assert torch.equal(out, reference) and torch.equal(again, reference)
    n = len(model.blocks)
    assert seen == 2 * [(i, list(range(i, min(n, i + ahead + 1))), True) for i in range(n)]
    assert state.in_flight == {}  # every copy released after its block
    assert stubbed_cuda.count("wait_event") == 2 * n  # compute waits for each block's own copy only

    # freed with the model: every block's host buffer unregistered
    del model, state, handles
    gc.collect()
    assert stubbed_cuda.count("unregister") == n


@pytest.mark.skipif(not CAN_COMPILE, reason=f"torch.compile cannot run on this CPU: {compile_problem('cpu')}")
def test_offloaded_compiled_blocks_do_not_recompile(stubbed_cuda):
    model = random_model()
    with torch.no_grad():
        reference = model(**inputs())
    offload = offload_blocks(model, "cpu", 1)
    compile_blocks(model)
    with torch.no_grad():
        first = model(**inputs())
        before = counters["stats"]["unique_graphs"]
        for _ in range(2):  # every call swaps new tensors into the blocks
            assert torch.equal(model(**inputs()), first)
        assert counters["stats"]["unique_graphs"] == before
    assert rel(first, reference) < 1e-5 and offload.in_flight == {}


# ---------------------------------------------------------------------------------------------- presets


def compose_config(*overrides: str):
    with initialize_config_module("conf", version_base=None):
        return compose("config", overrides=list(overrides))


TILES = VAETiling(tile_height=256, tile_width=256, stride_height=192, stride_width=192)
PRESETS = {
    "none": ("none", MemorySettings()),
    "fast": ("none", MemorySettings(compile=True)),
    "24gb": ("none", MemorySettings(compile=True, offload=True, offload_ahead=2, encoder_device="cpu")),
    "12gb": ("fp8_weights", MemorySettings(compile=True, offload=True, offload_ahead=1, vae_tiling=TILES, encoder_device="cpu")),
}


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_composes_validates_and_converts(name):
    quant, settings = PRESETS[name]
    # a cluster's driver need not have the GPUs (the actors check their device when they load)
    cfg = compose_config(f"memory={name}", "cluster=address", "model=infinitetalk_14b", *ONE_JOB)
    validate(cfg)
    assert cfg.quant.mode == quant
    assert memory_settings(cfg) == settings


def test_the_default_is_no_measures():
    cfg = compose_config(*ONE_JOB)
    validate(cfg)
    assert memory_settings(cfg) == MemorySettings()


@pytest.mark.parametrize("overrides, mode", [(["memory=12gb", "quant=fp8"], "fp8"), (["quant=none", "memory=12gb"], "none")])
def test_a_quant_on_the_command_line_wins_over_the_preset(overrides, mode):
    assert compose_config(*overrides, *ONE_JOB).quant.mode == mode


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_local_offload_without_a_gpu_is_refused():
    message = _config_error("memory=24gb")
    assert message.startswith("memory.offload: block offload cannot run on cpu")


@pytest.mark.parametrize("overrides, key, says", [
    (["memory.offload_ahead=-1"], "memory.offload_ahead", "less than 0"),
    (["memory.encoder_device=gpu"], "memory.encoder_device", "null (model.device), cpu"),
    (["memory=24gb", "cluster=address", "model.device=cpu"], "memory.offload", "model.device is cpu"),
    (["memory=12gb", "cluster=address", "memory.vae_tiling.tile_width=100"], "memory.vae_tiling.tile_width", "multiple of 8"),
    (["memory=12gb", "cluster=address", "memory.vae_tiling.stride_height=320"], "memory.vae_tiling.stride_height",
     "larger than tile_height 256"),
])
def test_bad_memory_values_name_the_key(overrides, key, says):
    message = _config_error(*overrides)
    assert message.startswith(f"{key}: ") and says in message


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(compose_config(*overrides, *ONE_JOB))
    return str(caught.value)


def test_the_settings_reach_the_renderer(tmp_path):
    """What the Renderer actor does with them when it loads (without Ray): VAE tiling, compiled blocks
    and VAE decode, and offload refused before anything loads on a machine that cannot run it."""
    cfg = compose_config(f"model.dir={tmp_path / 'tiny'}", "memory=24gb", "cluster=address", *ONE_JOB)
    paths = write_tiny_checkpoints(tmp_path / "tiny")
    with pytest.raises(KernelUnavailable, match="^block offload cannot run on cpu"):
        build_renderer(paths, model_spec(cfg), "cpu")
    tiled = MemorySettings(compile=CAN_COMPILE, vae_tiling=TILES)
    models = build_renderer(paths, ModelSpec(precision(cfg), memory=tiled), "cpu")
    vae = models.vae.module
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (256, 192)
    assert all(("forward" in vars(b)) == CAN_COMPILE for b in models.dit.blocks)
    # (a tiled VAE does not use them)
    assert (models.vae.decode_chunk is not decode_chunk) == (models.vae.encode_chunk is not encode_chunk) == CAN_COMPILE
    untiled = build_renderer(paths, ModelSpec(precision(cfg)), "cpu")
    assert not untiled.vae.module.use_tiling and not any("forward" in vars(b) for b in untiled.dit.blocks)
    assert untiled.vae.decode_chunk is decode_chunk and untiled.vae.encode_chunk is encode_chunk


def test_the_settings_reach_the_model_spec(tmp_path):
    import farm.run

    cfg = compose_config(f"model.dir={tmp_path / 'tiny'}", "memory=fast", *ONE_JOB)
    assert farm.run._actor_spec(cfg, gpus=0).model.memory == MemorySettings(compile=True)
