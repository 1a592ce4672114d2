"""A run's configuration: the schema of conf/, the checks on its values, and the plain pipeline
dataclasses it turns into.

The dataclasses below are the schema (names, types, what a value means); the values live once, in
conf/*.yaml. They are registered in Hydra's ConfigStore and conf/config.yaml composes on top of them,
so the composed config is in OmegaConf's struct mode: an unknown key or a wrong type fails while
composing, naming the key. `validate` then checks the values (ranges, names the pipeline knows) with
the pipeline's own validators, and the converters hand the driver the pipeline's dataclasses
(RenderSettings, CheckpointPaths, and pipeline.assemble's ModelSpec), which is all an actor ever sees of the config.

The CLI imports this module before Hydra has parsed the command line, so at the top it imports only
light modules (no torch, no model code): `talkfarm --help` and a misspelt key answer at once. What
validate and the converters need of the pipeline's heavier modules is imported in the function that
uses it.
"""

import ast
import contextlib
import inspect
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.job import RenderSettings, SettingError

if TYPE_CHECKING:
    from pipeline.models.checkpoints import CheckpointPaths, Precision
    from pipeline.assemble import MemorySettings, ModelSpec

DEVICES = ("auto", "cuda", "cpu")
CLUSTER_MODES = ("local", "address")

# RenderSettings field -> the config key that sets it: render_settings reads these keys, and validate
# names the key of the field that RenderSettings refuses.
SETTINGS_KEYS = {
    "window": "window.frames",
    "motion": "window.motion",
    "scheduler": "sampler.scheduler",
    "steps": "sampler.steps",
    "shift": "sampler.shift",
    "text_scale": "sampler.text_scale",
    "audio_scale": "sampler.audio_scale",
    "apg": "sampler.apg",
    "batched_guidance": "sampler.batched_guidance",
    "color_match": "output.color_match",
    "color_strength": "output.color_strength",
    "size": "output.size",
    "crf": "output.crf",
}


# Besides SETTINGS_KEYS, what a video depends on beyond its row: the model (all of it but its device), the
# GEMMs' and attention's kernels, the VAE's tiles. Stored windows and outputs made with other values are stale.
MODEL_KEYS = ("model", "quant.mode", "attention.backend", "memory.vae_tiling")


def output_settings(cfg: DictConfig) -> dict[str, Any]:
    """{dotted key: value} of every setting of the run that changes a row's video (SETTINGS_KEYS, MODEL_KEYS),
    nested ones flattened; a key the config lacks (one an older talkfarm wrote) is None."""
    flat: dict[str, Any] = {}

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                add(f"{key}.{name}", inner)
        elif key != "model.device":  # the same video on any device, within its rounding
            flat[key] = value

    for key in (*SETTINGS_KEYS.values(), *MODEL_KEYS):
        value = OmegaConf.select(cfg, key, default=None)
        add(key, OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value)
    return flat


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line that starts with the key."""


# ---------------------------------------------------------------------------------------------- schema
# Fields have no defaults on purpose: OmegaConf reads that as "must be set", so a YAML file that forgets
# a key fails at start-up instead of running with a second, silent default.


@dataclass
class PrecisionConfig:
    """Base dtype of each component: bf16, fp16 or fp32."""

    dit: str  # the DiT (with InfiniteTalk's audio modules)
    t5: str  # the umT5 text encoder
    clip: str  # the CLIP image encoder
    vae: str  # the Wan VAE


@dataclass
class ModelConfig:
    """What every model= option has."""

    device: str  # auto (cuda where the cluster has GPUs as the run starts, else cpu), cuda or cpu
    precision: PrecisionConfig  # base dtype of each component: bf16, fp16 or fp32


@dataclass
class TinyModel(ModelConfig):
    """model=tiny: the real architecture at toy size, written on first use."""

    dir: str  # where it is written; `~` is the home directory of the machine that writes it


@dataclass
class InfiniteTalk14B(ModelConfig):
    """model=infinitetalk_14b: the official checkpoints, each path overridable."""

    weights: str  # the folder that wan_dir, infinitetalk and wav2vec_dir are in, unless given
    wan_dir: str  # Wan2.1-I2V-14B-480P/: DiT shards, config.json, T5, CLIP, VAE, tokenizer
    infinitetalk: str  # InfiniteTalk/single/infinitetalk.safetensors: the audio modules
    wav2vec_dir: str  # chinese-wav2vec2-base/: the audio encoder
    dit_file: str | None  # a ComfyUI-style single DiT file (bf16 or fp8) instead of wan_dir's shards
    t5_file: str | None  # a single T5 file instead of wan_dir's
    clip_file: str | None  # a single CLIP file instead of wan_dir's
    vae_file: str | None  # a single VAE file instead of wan_dir's


@dataclass
class QuantConfig:
    mode: str  # none, or a mode of pipeline.kernels.fp8.MODES


@dataclass
class AttentionConfig:
    backend: str  # a backend of pipeline.kernels.attention


@dataclass
class VAETilingConfig:
    """pipeline.models.vae.VAETiling, in pixels: tiles overlap by tile - stride and are blended."""

    tile_height: int  # pixels
    tile_width: int  # pixels
    stride_height: int  # pixels from one tile to the next; less than the tile: they overlap
    stride_width: int  # pixels from one tile to the next


@dataclass
class MemoryConfig:
    """Where the weights live and what trades speed for memory (pipeline/kernels/compile.py, offload.py)."""

    compile: bool  # torch.compile each DiT block (one graph shared by all) and the untiled VAE encode and decode
    offload: bool  # DiT blocks in page-locked host memory, streamed to the GPU (CUDA only)
    offload_ahead: int  # with offload: blocks copied to the GPU ahead of their use
    vae_tiling: VAETilingConfig | None  # null: untiled VAE (exact, fastest); tiles save memory, cost time
    encoder_device: str | None  # T5, CLIP, wav2vec2: null on model.device, or cpu (off the GPU)


@dataclass
class SamplerConfig:
    scheduler: str  # the sampler: one of pipeline.sampler.SCHEDULERS
    steps: int  # DiT evaluations per window (times the guidance passes)
    shift: float  # Wan's timestep shift: 7 at 480p, 11 at 720p
    text_scale: float  # 1 drops the negative-prompt pass
    audio_scale: float  # 1 (with text_scale 1) drops the silent-audio pass
    apg: bool  # adaptive projected guidance
    batched_guidance: bool  # the guidance passes as one batched forward: faster, more memory


@dataclass
class WindowConfig:
    frames: int  # per window, 4n+1
    motion: int  # frames carried over from the previous window, 4k+1, fewer than `frames`


@dataclass
class ClusterConfig:
    mode: str  # local: an in-process Ray; address: join the Ray cluster at `address`
    address: str | None  # cluster=address only
    renderers: int | None  # DiT+VAE actors; null: one per GPU, 1 without GPUs; with no GPU yet: how many to ask for
    encoders: int  # T5/CLIP/wav2vec2 actors
    max_retries: int  # per job, after failures a retry can help
    actor_failure_limit: int  # failures in a row before a renderer is replaced
    max_in_flight: int | None  # jobs encoded or rendering at once; null: 2 per renderer
    sp_degree: int  # GPUs per renderer: >1 splits each window's DiT over a group (sequence parallel)


@dataclass
class StorageConfig:
    root: str | None  # local path or fsspec URL; null: see run_root
    keep_windows: bool  # keep a finished job's window segments and resume state (the window log stays anyway)


@dataclass
class JobConfig:
    """One job from the command line, with the fields of a manifest row."""

    id: str | None  # null: the audio file's stem
    image: str | None  # a face image ...
    video: str | None  # ... or a video to dub
    audio: str | None  # the speech: a path or an fsspec URL, relative paths against the current directory
    audio_2: str | None  # the second speaker
    audio_type: str  # two speakers: para or add
    # The numbers are checked with the job (OmegaConf cannot type a nested list of floats that also takes ints).
    boxes: list[list[Any]] | None  # two speakers: [[left, top, right, bottom], [...]] in source pixels
    prompt: str  # what the video shows, for the text encoder
    negative_prompt: str | None  # null: the official one
    seed: int  # the noise's seed: the same seed and inputs give the same video
    output: str | None  # file name in the run's outputs/; null: <id>.mp4


@dataclass
class InputsConfig:
    """Where a manifest's media may be read from (farm/inputs.py); the command line's job.* paths may be anywhere."""

    # Besides the manifest's folder and the run's object store: local folders or URL prefixes
    # (s3://bucket/media/, https://cdn.example.com/clips/); a manifest's other paths are refused
    allow: list[str]


@dataclass
class OutputConfig:
    size: str  # a bucket name of pipeline.media.BUCKETS or WIDTHxHEIGHT
    color_match: str  # how each window's colours are matched to the reference: a method of pipeline.color.METHODS
    color_strength: float  # 0 off, 1 fully matched
    crf: int  # H.264 quality, pipeline.job.CRF_RANGE


@dataclass
class Config:
    """The whole run: conf/config.yaml with one option of each group."""

    manifest: str | None  # a batch: path or fsspec URL; or else job.audio
    job: JobConfig
    inputs: InputsConfig
    output: OutputConfig
    model: ModelConfig  # a TinyModel or an InfiniteTalk14B, by the model= choice
    quant: QuantConfig
    memory: MemoryConfig
    attention: AttentionConfig
    sampler: SamplerConfig
    window: WindowConfig
    cluster: ClusterConfig
    storage: StorageConfig
    retry_failed: bool  # render again the rows an earlier run failed for good (retryable false)
    rerender: bool  # render again the rows an earlier run made with other settings or another model
    verbose: bool  # the console shows the actors' output and every log line too, not only the run log
    dry_run: bool  # check every row and print the plan and a GPU-time estimate; nothing rendered or written


# conf/config.yaml starts from "talkfarm"; each model/*.yaml starts from its own schema. Stored outside
# the config groups, so that `--help` and `model=...` list only the YAML options.
_store = ConfigStore.instance()
_store.store(name="talkfarm", node=Config)
_store.store(name="tiny_model", node=TinyModel)
_store.store(name="infinitetalk_14b_model", node=InfiniteTalk14B)


def key_notes(cfg: DictConfig) -> dict[str, str]:
    """Every leaf key of the composed `cfg` (dotted) -> its one-line description: the comment beside its
    field in the schema above, or the comment lines just over it (what `talkfarm --help` prints)."""
    notes: dict[str, str] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        described = _field_notes(OmegaConf.get_type(node))
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
                walk(child, f"{prefix}{key}.")
            else:
                notes[f"{prefix}{key}"] = described.get(key, "")

    walk(cfg, "")
    return notes


def _field_notes(schema: type) -> dict[str, str]:
    """{field: its comment} of a schema dataclass and the dataclasses it extends, read from their source."""
    notes: dict[str, str] = {}
    for klass in reversed([k for k in schema.__mro__ if is_dataclass(k)]):
        lines, _ = inspect.getsourcelines(klass)
        for node in ast.parse(textwrap.dedent("".join(lines))).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = lines[node.lineno - 1]
                beside = line.partition("  # ")[2].strip()
                above = []
                for earlier in reversed(lines[: node.lineno - 1]):
                    if not earlier.strip().startswith("#"):
                        break
                    above.insert(0, earlier.strip().lstrip("#").strip())
                notes[node.target.id] = beside or " ".join(above)
    return notes


# ---------------------------------------------------------------------------------------------- checks


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot run. Reads no file, loads nothing.
    The values first; then the checks that need the model code (dtypes, attention heads) and, with
    cluster=local, this machine's kernels: those import torch's and the pipeline's heavier modules."""
    try:  # every value set, every interpolation resolvable
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key}: {exc.msg.splitlines()[0]}") from None
    _check_keys(cfg)

    if bool(cfg.manifest) == bool(cfg.job.audio):
        raise ConfigError(
            "manifest, job.audio: give exactly one, manifest=<path or URL> for a batch or "
            "job.audio=<file> (with job.image or job.video) for one job"
        )

    from farm.storage import missing_backend

    for key, url in (("manifest", cfg.manifest), ("storage.root", cfg.storage.root)):
        if url and (problem := missing_backend(url)):
            raise ConfigError(f"{key}={url}: {problem}")
    from farm.inputs import check_location

    for location in cfg.inputs.allow:
        if problem := check_location(location):
            raise ConfigError(f"inputs.allow: {problem}")

    cluster = cfg.cluster
    _one_of("cluster.mode", cluster.mode, CLUSTER_MODES)
    if (cluster.mode == "address") != (cluster.address is not None):
        raise ConfigError(
            f"cluster.address: {cluster.address!r} with cluster.mode={cluster.mode}; an address is "
            "given with cluster=address (auto: the cluster this process runs in) and only then"
        )
    for key, minimum in [
        ("renderers", 1), ("encoders", 1), ("max_retries", 0), ("actor_failure_limit", 1), ("max_in_flight", 1),
        ("sp_degree", 1),
    ]:
        if cluster[key] is not None and cluster[key] < minimum:
            raise ConfigError(f"cluster.{key}: {cluster[key]} is less than {minimum}")

    from pipeline.kernels.attention import BACKENDS as ATTENTION_BACKENDS
    from pipeline.kernels.fp8 import MODES as FP8_MODES

    _one_of("model.device", cfg.model.device, DEVICES)
    _one_of("quant.mode", cfg.quant.mode, ("none", *FP8_MODES))  # the options of conf/quant/
    if cluster.mode != "local":  # with cluster=local, _check_this_machine asks the backend itself
        _one_of("attention.backend", cfg.attention.backend, [*ATTENTION_BACKENDS, "auto"])
    _check_memory(cfg)
    try:
        render_settings(cfg)
    except SettingError as exc:
        raise ConfigError(f"{SETTINGS_KEYS[exc.field]}: {exc.problem}") from None

    from pipeline.models.checkpoints import parse_dtype
    from pipeline.parallel import check_sp_degree

    for component in ("dit", "t5", "clip", "vae"):
        with _naming(f"model.precision.{component}"):
            parse_dtype(cfg.model.precision[component], component)
    with _naming("cluster.sp_degree"):
        check_sp_degree(_attention_heads(cfg.model), cluster.sp_degree)
    # Actors check their device's kernels again when they load. With cluster=local their device is
    # this machine's, so check it now; a cluster's driver may have no GPU, so there only names.
    if cluster.mode == "local":
        _check_this_machine(cfg)


def _attention_heads(model: DictConfig) -> int:
    """The DiT's attention heads, known without reading a weight file: model=tiny's from its config
    (pipeline.models.tiny); model=infinitetalk_14b is Wan2.1-I2V-14B, whose official config.json says
    num_heads 40, as pipeline.models.dit.DiTConfig's defaults (the 14B's) do."""
    if issubclass(OmegaConf.get_type(model), TinyModel):
        from pipeline.models.tiny import TINY_WAN_CONFIG

        return TINY_WAN_CONFIG["num_heads"]
    from pipeline.models.dit import DiTConfig

    return DiTConfig().num_heads


def _check_memory(cfg: DictConfig) -> None:
    memory = cfg.memory
    if memory.offload_ahead < 0:
        raise ConfigError(f"memory.offload_ahead: {memory.offload_ahead} is less than 0")
    if memory.encoder_device not in (None, "cpu"):
        raise ConfigError(f"memory.encoder_device: {memory.encoder_device!r} is not one of null (model.device), cpu")
    if memory.offload and cfg.model.device == "cpu":
        raise ConfigError("memory.offload: block offload streams weights to a GPU, and model.device is cpu")
    tiling = memory.vae_tiling
    if tiling is not None:
        from pipeline.models.vae import SPATIAL_FACTOR

        for axis in ("height", "width"):
            tile, stride = tiling[f"tile_{axis}"], tiling[f"stride_{axis}"]
            for key, value in ((f"tile_{axis}", tile), (f"stride_{axis}", stride)):
                if value <= 0 or value % SPATIAL_FACTOR:
                    raise ConfigError(f"memory.vae_tiling.{key}: {value} is not a positive multiple of "
                                      f"{SPATIAL_FACTOR}")
            if stride > tile:
                raise ConfigError(f"memory.vae_tiling.stride_{axis}: {stride} is larger than tile_{axis} {tile}")


def _check_this_machine(cfg: DictConfig) -> None:
    """cluster=local: the model's device, its kernels and memory measures, as the actors here will ask."""
    import torch

    from pipeline.kernels import fp8
    from pipeline.kernels.attention import get_attention
    from pipeline.kernels.compile import check_compile
    from pipeline.kernels.offload import check_offload

    model, memory = cfg.model, cfg.memory
    if model.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: cuda, but this machine has no CUDA GPU (cluster=local)")
    device = "cuda" if model.device != "cpu" and torch.cuda.is_available() else "cpu"
    with _naming("attention.backend"):
        get_attention(cfg.attention.backend, None if model.device == "auto" else model.device)
    if cfg.quant.mode != "none":
        with _naming("quant.mode"):
            fp8.check_mode(cfg.quant.mode, device)
    if memory.offload:
        with _naming("memory.offload"):
            check_offload(device)
    if memory.compile:
        with _naming("memory.compile"):
            check_compile(device)


def _check_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra lets `+key=value` add a key that the schema lacks (it opens struct mode to append);
    refuse it here as struct mode refuses `key=value`."""
    schema = OmegaConf.get_type(node)
    known = [f.name for f in fields(schema)]
    for key in node:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: not a key of {schema.__name__} (known: {', '.join(known)})")
        child = node[key]
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            _check_keys(child, f"{prefix}{key}.")


def _one_of(key: str, value, known) -> None:
    if value not in known:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(known)}")


@contextlib.contextmanager
def _naming(key: str) -> Iterator[None]:
    """Turn a pipeline validator's ValueError into a ConfigError that starts with the key."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# ---------------------------------------------------------------------------------------------- converters


def render_settings(cfg: DictConfig) -> RenderSettings:
    """The run's RenderSettings; raises SettingError (a JobError) naming the field it refuses."""
    return RenderSettings(**{field: OmegaConf.select(cfg, key) for field, key in SETTINGS_KEYS.items()})


def checkpoint_paths(cfg: DictConfig) -> "CheckpointPaths":
    """Where the weights are; reads and writes nothing. model=tiny: where the actors write the tiny
    set on first use, where they run, since the nodes of a cluster need not share the driver's disk."""
    model = cfg.model
    if issubclass(OmegaConf.get_type(model), TinyModel):
        from pipeline.models.tiny import tiny_checkpoint_paths

        return tiny_checkpoint_paths(_local(model.dir))
    from pipeline.models.checkpoints import CheckpointPaths

    return CheckpointPaths(
        wan_dir=_local(model.wan_dir),
        infinitetalk=_local(model.infinitetalk),
        wav2vec_dir=_local(model.wav2vec_dir),
        dit_file=_local(model.dit_file),
        t5_file=_local(model.t5_file),
        clip_file=_local(model.clip_file),
        vae_file=_local(model.vae_file),
    )


def precision(cfg: DictConfig) -> "Precision":
    from pipeline.models.checkpoints import Precision

    p = cfg.model.precision
    return Precision(dit=p.dit, t5=p.t5, clip=p.clip, vae=p.vae)


def memory_settings(cfg: DictConfig) -> "MemorySettings":
    from pipeline.assemble import MemorySettings
    from pipeline.models.vae import VAETiling

    memory = cfg.memory
    tiling = memory.vae_tiling
    return MemorySettings(
        compile=memory.compile,
        offload=memory.offload,
        offload_ahead=memory.offload_ahead,
        vae_tiling=None if tiling is None else VAETiling(**tiling),
        encoder_device=memory.encoder_device,
    )


def model_spec(cfg: DictConfig) -> "ModelSpec":
    """How the renderers build their models (pipeline.assemble); quant.mode none is the pipeline's None."""
    from pipeline.assemble import ModelSpec

    quant = None if cfg.quant.mode == "none" else cfg.quant.mode
    return ModelSpec(precision(cfg), cfg.attention.backend, quant, memory_settings(cfg), cfg.window.frames)


def run_root(cfg: DictConfig) -> str:
    """storage.root, or runs/<manifest file stem> (one job: runs/<job.id or the audio file's stem>).
    Local paths come back absolute: actors need not share the driver's working directory."""
    root = cfg.storage.root
    if not root:
        name = _stem(cfg.manifest) if cfg.manifest else (cfg.job.id or _stem(cfg.job.audio))
        root = os.path.join("runs", name)
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))


def _stem(path_or_url: str) -> str:
    return PurePosixPath(urlsplit(path_or_url).path).stem


def _local(path: str | None) -> Path | None:
    return None if path is None else Path(path).expanduser()
