"""Loading checkpoints onto a device tensor by tensor: the official layout and ComfyUI single files.

Models are built with their parameters on the meta device (no memory, no random init), then each
tensor is read from its file (safetensors lazily, .pth memory-mapped), converted to its target device
and dtype, and put in place. Host memory holds at most one file's mapping and one tensor in flight,
not the whole model twice as `load_state_dict` on a merged dict would.

The key checks are strict: a missing or unexpected key stops the load with the key names and the
file they came from, and a file handed to the wrong slot (the VAE as the DiT, say) is refused with
what it looks like.
"""

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from transformers import CLIPVisionModel, UMT5EncoderModel

from pipeline.kernels import fp8
from pipeline.models.audio import AudioEncoder
from pipeline.models.clip import CLIPImageEncoder, clip_tensors_from_official, clip_vision_config_from_shapes
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT, keeps_fp32
from pipeline.models.text import TextEncoder, t5_config_from_shapes, t5_tensors_from_official
from pipeline.models.vae import VAETiling, WanVAE

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as asked; the message names the file and the keys."""


# ---------------------------------------------------------------------------------------------- files


class TensorFile:
    """One checkpoint file read tensor by tensor: .safetensors lazily, .pth/.pt memory-mapped.

    `.pth` files are pickles: they are only ever opened with weights_only=True.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such checkpoint file")
        if self.path.suffix == ".safetensors":
            self._st = safe_open(str(self.path), framework="pt")
            self._keys = list(self._st.keys())
        elif self.path.suffix in (".pth", ".pt", ".bin"):
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # a truncated or non-tensor pickle: say which file
                raise CheckpointError(f"{self.path}: not a readable tensor checkpoint ({exc})") from exc
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{self.path}: expected a state dict of tensors")
            self._sd = state
            self._keys = list(state)
        else:
            raise CheckpointError(f"{self.path}: unknown checkpoint format (expected .safetensors or .pth)")

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if hasattr(self, "_st"):
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if hasattr(self, "_st") else self._sd[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._keys}


# ---------------------------------------------------------------------------------------------- slots

# Which component a key belongs to, by its official name. Used to refuse a file given for the wrong
# slot before any tensor is read.
KEY_KINDS: list[tuple[str, re.Pattern]] = [
    ("InfiniteTalk audio modules", re.compile(r"^(audio_proj\.|blocks\.\d+\.(norm_x|audio_cross_attn)\.)")),
    (
        "Wan DiT",
        re.compile(
            r"^((patch_embedding|text_embedding|time_embedding|time_projection|img_emb|head)\."
            r"|blocks\.\d+\.(self_attn|cross_attn|norm3|ffn\.\d|modulation))"
        ),
    ),
    ("T5 text encoder", re.compile(r"^(token_embedding\.|norm\.weight$|blocks\.\d+\.(attn|ffn\.(gate|fc\d)|norm\d|pos_embedding)\.)")),
    ("CLIP", re.compile(r"^(visual\.|textual\.|log_scale$)")),
    ("Wan VAE", re.compile(r"^(encoder\.|decoder\.|conv1\.|conv2\.)")),
]


def key_kind(key: str) -> str | None:
    return next((kind for kind, pattern in KEY_KINDS if pattern.match(key)), None)


def check_slot(file: TensorFile, slot: str, allowed: set[str], keys: Iterable[str] | None = None) -> None:
    """Refuse `file` for `slot` if its keys belong to another component."""
    for key in keys if keys is not None else file.keys():
        kind = key_kind(key)
        if kind is not None and kind not in allowed:
            raise CheckpointError(
                f"{file.path}: given as the {slot} but it looks like a {kind} checkpoint (key {key!r})"
            )


# ---------------------------------------------------------------------------------------------- meta build


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers real (buffers such as position
    ids are small and computed in __init__, not stored in checkpoints)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if is_param:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def load_into(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor, Path]],
    device: torch.device | str,
    dtype_of: Callable[[str], torch.dtype],
    what: str,
) -> None:
    """Put every (name, tensor, source file) in place on `device` in `dtype_of(name)`.

    Strict: every parameter and persistent buffer of `model` must be given exactly once (tied
    parameters once per tie group) and nothing else. Errors name the keys and their files.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {n: b for n, b in model.named_buffers() if n.split(".")[-1] not in _non_persistent(model, n)}
    # Tied parameters (one Parameter under several names) are satisfied by any of their names.
    ties: dict[int, list[str]] = {}
    for n, p in params.items():
        ties.setdefault(id(p), []).append(n)
    alias = {n: ties[id(p)] for n, p in params.items()}

    set_by: dict[str, str] = {}  # name -> the key whose tensor filled it (differs for a tied twin)
    unexpected: list[str] = []
    sources: set[Path] = set()
    for name, tensor, source in tensors:
        sources.add(source)
        target = params.get(name, buffers.get(name))
        if target is None:
            unexpected.append(f"{name} (in {source})")
            continue
        if name in set_by:
            if set_by[name] != name:
                continue  # the twin of a tied parameter that is already in place
            raise CheckpointError(f"{what}: key {name!r} given twice (again in {source})")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{what}: {name!r} in {source} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        # Always a copy: a tensor read from a file may share the file's memory map, and keeping it
        # would keep the whole mapped file resident.
        dtype = dtype_of(name) if tensor.is_floating_point() else tensor.dtype
        value = tensor.to(device=device, dtype=dtype, copy=True)
        for each in alias.get(name, [name]):
            _set_tensor(model, each, value, each in params)
            set_by[each] = name

    missing = [n for n in list(params) + list(buffers) if n not in set_by]
    if missing or unexpected:
        parts = []
        if missing:
            files = ", ".join(sorted(str(s) for s in sources)) or "no files"
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])}; read {files})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        raise CheckpointError(f"{what} does not match its checkpoint: " + "; ".join(parts))
    # Buffers no file holds (position ids made in __init__, on the CPU) follow the weights to `device`.
    for name, buffer in model.named_buffers():
        if name not in set_by:
            _set_tensor(model, name, buffer.to(device), is_param=False)


def _non_persistent(model: nn.Module, buffer_name: str) -> set[str]:
    owner_name, _, _ = buffer_name.rpartition(".")
    return model.get_submodule(owner_name)._non_persistent_buffers_set


def describe_dtypes(model: nn.Module) -> str:
    """'bf16 x 1,234,567 params, fp32 x 8,910' - the effective precision, for the load log."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return ", ".join(f"{str(d).removeprefix('torch.')} x {n:,}" for d, n in sorted(counts.items(), key=lambda x: -x[1]))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str, component: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{component} dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def log_loaded(what: str, files: Iterable[Path], device, model: nn.Module, started: float) -> None:
    """The effective settings of a load, once: where from, where to, which dtypes, how long."""
    log.info(
        "loaded %s from %s on %s: %s (%.1f s)",
        what, ", ".join(str(f) for f in files), device, describe_dtypes(model), time.perf_counter() - started,
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


# ---------------------------------------------------------------------------------------------- DiT

DIT_SLOT = {"Wan DiT", "InfiniteTalk audio modules"}  # ComfyUI files may hold both
AUDIO_SLOT = {"InfiniteTalk audio modules"}
# ComfyUI single files prefix the original names; fp8 files carry per-layer scales and a marker.
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_SCALE, FP8_INPUT_SCALE, FP8_MARKER = ".scale_weight", ".scale_input", "scaled_fp8"
HEAD_DIM = 128  # every Wan2.1 model; used only when a single file comes without config.json


def original_name(key: str) -> str:
    for prefix in COMFY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def wan_dit_shards(wan_dir: Path) -> list[Path]:
    """The DiT shards of an official Wan directory, from its index file if there is one."""
    index = wan_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        shards = [wan_dir / n for n in names]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shards that are not there: {', '.join(absent[:3])}")
        return shards
    shards = sorted(wan_dir.glob("diffusion_pytorch_model*.safetensors"))
    if not shards:
        raise CheckpointError(f"{wan_dir}: no diffusion_pytorch_model*.safetensors shards")
    return shards


def dit_shapes(paths: Iterable[Path], slot: str, allowed: set[str]) -> dict[str, tuple[int, ...]]:
    """Original-name -> shape over files (headers only), refusing files that belong to another slot."""
    shapes = {}
    for path in paths:
        file = TensorFile(path)
        names = {original_name(k): k for k in file.keys()}
        check_slot(file, slot, allowed, names)
        shapes |= {n: file.shape(k) for n, k in names.items()}
    return shapes


def dit_config(config_json: Path | None, shapes: dict[str, tuple[int, ...]]) -> DiTConfig:
    """Architecture from config.json where given (else inferred), the encoder and audio widths from
    the tensor shapes (the official config.json does not record them)."""
    try:
        text_dim = shapes["text_embedding.0.weight"][1]
        clip_dim = shapes["img_emb.proj.1.weight"][1]
        audio_dim = shapes["audio_proj.norm.weight"][0]
        audio_hidden, proj1_in = shapes["audio_proj.proj1.weight"]
        audio_tokens = shapes["audio_proj.proj3.weight"][0] // audio_dim
    except KeyError as exc:
        raise CheckpointError(f"DiT/InfiniteTalk files lack {exc.args[0]!r}: is the InfiniteTalk audio file given?") from None
    window = DiTConfig.audio_window
    widths = dict(
        text_dim=text_dim, clip_dim=clip_dim, audio_dim=audio_dim, audio_hidden=audio_hidden,
        audio_layers=proj1_in // (window * audio_dim), audio_tokens=audio_tokens,
    )
    if config_json is not None:
        return DiTConfig.from_wan_json(config_json, **widths)
    dim, in_dim = shapes["patch_embedding.weight"][:2]
    return DiTConfig(
        dim=dim, in_dim=in_dim, num_heads=dim // HEAD_DIM,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_layers=len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}),
        out_dim=shapes["head.head.weight"][0] // 4, freq_dim=shapes["time_embedding.0.weight"][1],
        **widths,
    )


def dit_tensors(
    paths: Iterable[Path], keep_fp8: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(original name, tensor, file) for every weight, one file open at a time. fp8 weights are
    de-quantised with their scale (scalar or per output channel), except e4m3 weights whose name
    `keep_fp8` accepts: those come as stored, each followed by its `<layer>.scale_weight` (ones if the
    file has none)."""
    for path in paths:
        file = TensorFile(path)
        names = {original_name(k): k for k in file.keys()}
        for name, key in names.items():
            if name == FP8_MARKER or name.endswith((FP8_SCALE, FP8_INPUT_SCALE)):
                continue
            tensor = file.get(key)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale_name = name.removesuffix(".weight") + FP8_SCALE
                scale = file.get(names[scale_name]).float() if scale_name in names else torch.ones(())
                if tensor.dtype == torch.float8_e4m3fn and keep_fp8(name):
                    yield name, tensor, path
                    yield scale_name, scale, path
                    continue
                scale = scale.reshape(-1, *[1] * (tensor.dim() - 1)) if scale.numel() > 1 else scale
                tensor = tensor.float() * scale
            yield name, tensor, path
        del file  # unmap the shard before opening the next


def load_dit(
    dit_files: list[Path],
    audio_file: Path | None,
    config_json: Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quant: str | None = None,
) -> WanInfiniteTalkDiT:
    """The DiT from its shards (or a single file) plus the InfiniteTalk audio file, strictly.

    quant ('fp8', 'fp8_weights'; see pipeline.kernels.fp8): the blocks' linear layers are built as fp8
    layers first; e4m3 weights of a pre-quantised file load into them as stored, other weights are
    quantised on `device` one tensor at a time."""
    started = time.perf_counter()
    shapes = dit_shapes(dit_files, "DiT", DIT_SLOT)
    audio_files = [] if audio_file is None else [audio_file]
    shapes |= dit_shapes(audio_files, "InfiniteTalk audio file", AUDIO_SLOT)
    cfg = dit_config(config_json, shapes)
    with torch.device("meta"):
        model = WanInfiniteTalkDiT(cfg)
    files = [*dit_files, *audio_files]

    def dtype_of(name: str) -> torch.dtype:
        return torch.float32 if keeps_fp32(name) else dtype

    if quant is None:
        tensors = dit_tensors(files)
    else:
        layers = fp8.apply_fp8(model, quant, device)
        tensors = fp8.quantised_tensors(dit_tensors(files, fp8.keeps_fp8(layers)), layers, device)
        dtype_of = fp8.fp8_dtype_of(dtype_of, layers)
    load_into(model, tensors, device, dtype_of, "the DiT")
    log_loaded("DiT", files, device, model.eval(), started)
    return model


# ---------------------------------------------------------------------------------------------- encoders and VAE


def _converted(file: TensorFile, convert: Callable) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Official tensors through a per-key converter; a key the converter does not know is reported
    as unexpected, under its official name."""
    for key in file.keys():
        try:
            pairs = convert(key, file.get(key))
        except KeyError:
            yield key, file.get(key), file.path
            continue
        for name, tensor in pairs:
            yield name, tensor, file.path


def load_t5(path: Path, tokenizer_dir: Path, device="cpu", dtype=torch.bfloat16) -> TextEncoder:
    """Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or a ComfyUI umt5-xxl encoder file with the same keys)."""
    started = time.perf_counter()
    file = TensorFile(path)
    check_slot(file, "T5 text encoder", {"T5 text encoder"})
    with parameters_on_meta():
        model = UMT5EncoderModel(t5_config_from_shapes(file.shapes()))
    model.encoder.embed_tokens = model.shared  # one embedding under both names, as transformers ties them
    load_into(model, _converted(file, t5_tensors_from_official), device, lambda n: dtype, "the T5 encoder")
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"{tokenizer_dir}: T5 tokenizer directory missing")
    log_loaded("T5 encoder", [path], device, model, started)
    return TextEncoder(model, tokenizer_dir)


def load_clip(path: Path, device="cpu", dtype=torch.float16) -> CLIPImageEncoder:
    """The visual tower of Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`."""
    started = time.perf_counter()
    file = TensorFile(path)
    check_slot(file, "CLIP image encoder", {"CLIP"})
    with parameters_on_meta():
        model = CLIPVisionModel(clip_vision_config_from_shapes(file.shapes()))
    load_into(model, _converted(file, clip_tensors_from_official), device, lambda n: dtype, "the CLIP image encoder")
    log_loaded("CLIP image encoder", [path], device, model, started)
    return CLIPImageEncoder(model)


def load_vae(path: Path, device="cpu", dtype=torch.float32, tiling: VAETiling | None = None) -> WanVAE:
    """`Wan2.1_VAE.pth` (or a ComfyUI VAE file with the same keys). The VAE is small (~0.5 GB): it is
    converted as a whole, from the memory-mapped file."""
    started = time.perf_counter()
    file = TensorFile(path)
    check_slot(file, "VAE", {"Wan VAE"})
    try:
        vae = WanVAE.from_official({k: file.get(k) for k in file.keys()}, device=device, dtype=dtype, tiling=tiling)
    except (KeyError, RuntimeError) as exc:  # unknown keys (KeyError) or a strict-load mismatch
        raise CheckpointError(f"{path}: does not match the Wan VAE: {exc}") from None
    log_loaded("VAE", [path], device, vae.module, started)
    return vae


def load_wav2vec(directory: Path, device="cpu") -> AudioEncoder:
    """chinese-wav2vec2-base in Hugging Face format (config.json + weights)."""
    started = time.perf_counter()
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a wav2vec2 directory (no config.json)")
    encoder = AudioEncoder(directory, device)
    log_loaded("wav2vec2", [directory], device, encoder.model, started)
    return encoder


# ---------------------------------------------------------------------------------------------- the set

WAN_CONFIG = "config.json"
WAN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAN_VAE = "Wan2.1_VAE.pth"
WAN_T5_TOKENIZER = "google/umt5-xxl"


@dataclass(frozen=True)
class CheckpointPaths:
    """Where the weights are: the official directories, with optional single files (ComfyUI style)
    standing in for a component."""

    wan_dir: Path  # Wan2.1-I2V-14B-480P/
    infinitetalk: Path  # InfiniteTalk/single/infinitetalk.safetensors (or multi/)
    wav2vec_dir: Path  # chinese-wav2vec2-base/
    dit_file: Path | None = None  # e.g. Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors instead of the shards
    t5_file: Path | None = None
    clip_file: Path | None = None
    vae_file: Path | None = None

    def dit_files(self) -> list[Path]:
        return [self.dit_file] if self.dit_file else wan_dit_shards(self.wan_dir)

    def dit_config(self) -> Path | None:
        config = self.wan_dir / WAN_CONFIG
        return config if config.is_file() or not self.dit_file else None

    def t5(self) -> Path:
        return self.t5_file or self.wan_dir / WAN_T5

    def clip(self) -> Path:
        return self.clip_file or self.wan_dir / WAN_CLIP

    def vae(self) -> Path:
        return self.vae_file or self.wan_dir / WAN_VAE


@dataclass(frozen=True)
class Precision:
    """Base dtype per component ('bf16', 'fp16', 'fp32'). Defaults follow the official code, except
    the VAE in bf16: half the memory of fp32, faster, and its decode within 1.5% of fp32's
    (benchmarks/RESULTS.md, "The streamed VAE")."""

    dit: str = "bf16"
    t5: str = "bf16"
    clip: str = "fp16"
    vae: str = "bf16"


class ModelNotLoaded(RuntimeError):
    pass


class Models:
    """The loaded components. Reading one that was not loaded raises ModelNotLoaded naming it,
    instead of failing later on a None."""

    COMPONENTS = ("dit", "vae", "t5", "clip", "wav2vec")

    def __init__(self, **components):
        unknown = set(components) - set(self.COMPONENTS)
        if unknown:
            raise TypeError(f"unknown components {sorted(unknown)}")
        self._components = components

    def __getattr__(self, name):
        if name.startswith("_") or name not in self.COMPONENTS:
            raise AttributeError(name)
        component = self._components.get(name)
        if component is None:
            raise ModelNotLoaded(f"the {name} model is not loaded; load it with load_models(..., components=[..., {name!r}])")
        return component


def load_models(
    paths: CheckpointPaths,
    precision: Precision = Precision(),
    device: torch.device | str = "cpu",
    components: Iterable[str] = Models.COMPONENTS,
    vae_tiling: VAETiling | None = None,
    dit_quant: str | None = None,
) -> Models:
    """Load the requested components from `paths` onto `device`; `dit_quant` as `load_dit`'s `quant`."""
    components = list(components)
    unknown = set(components) - set(Models.COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {list(Models.COMPONENTS)}")
    dtype = {f.name: parse_dtype(getattr(precision, f.name), f.name) for f in fields(precision)}
    loaders = {
        "dit": lambda: load_dit(paths.dit_files(), paths.infinitetalk, paths.dit_config(), device, dtype["dit"], dit_quant),
        "vae": lambda: load_vae(paths.vae(), device, dtype["vae"], vae_tiling),
        "t5": lambda: load_t5(paths.t5(), paths.wan_dir / WAN_T5_TOKENIZER, device, dtype["t5"]),
        "clip": lambda: load_clip(paths.clip(), device, dtype["clip"]),
        "wav2vec": lambda: load_wav2vec(paths.wav2vec_dir, device),
    }
    return Models(**{name: loaders[name]() for name in components})
