"""What a job is (its inputs) and how it is rendered (its settings), as plain validated dataclasses.

A job is one face image or one video to dub, one or two speech tracks, a prompt and a seed. Settings
are shared by the jobs of a run, with a few per-job overrides (steps, colour matching, ...). Both are
checked before anything loads: a bad value raises a one-line error naming the field.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FPS = 25  # InfiniteTalk's video frame rate: the windows, the audio features and every output
SAMPLE_RATE = 16_000  # the speech encoder's (wav2vec2's) input rate; speech is decoded at this rate
# The shortest speech wav2vec2 can encode: its conv feature extractor (kernels 10,3,3,3,3,2,2, strides
# 5,2,2,2,2,2,2) has a 400-sample receptive field, so shorter audio gives it no frame at all.
MIN_AUDIO_SAMPLES = 400

# The official default negative prompt (wan/configs/wan_multitalk_14B.py).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
AUDIO_TYPES = ("para", "add")
CRF_RANGE = (0, 51)  # libx264 with 8-bit output


class JobError(ValueError):
    """A job or setting that cannot be rendered; the message names the field and the problem."""


class SettingError(JobError):
    """A RenderSettings field that cannot be rendered: `<field>: <problem>`. The field and the problem
    are kept apart, so that the config and the manifest can name their own key or column instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self):  # pickled as it was made (Ray sends exceptions between processes)
        return type(self), (self.field, self.problem)


@dataclass(frozen=True)
class Box:
    """A speaker's region in the source image, in pixels: x runs left to right, y top to bottom.

    (The official JSON gives boxes as [x_min, y_min, x_max, y_max] but indexes rows with x, i.e. its
    "x" is the vertical axis. We use the usual image convention and say so in the manifest docs.)
    """

    left: float
    top: float
    right: float
    bottom: float

    def check(self, width: int, height: int, name: str) -> None:
        if not (0 <= self.left < self.right <= width and 0 <= self.top < self.bottom <= height):
            raise JobError(
                f"{name}: box [left={self.left}, top={self.top}, right={self.right}, bottom={self.bottom}] "
                f"must satisfy 0 <= left < right <= {width} and 0 <= top < bottom <= {height} (source pixels)"
            )


@dataclass(frozen=True)
class Job:
    id: str
    audio: tuple[str, ...]  # one path, or two for two speakers (speaker 1 first)
    image: str | None = None  # a face image ...
    video: str | None = None  # ... or a video to dub (exactly one of the two)
    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 0
    audio_type: str = "para"  # two speakers: "para" talk at once, "add" speaker 1 then speaker 2
    boxes: tuple[Box, ...] | None = None  # two speakers: their regions; default left/right halves

    def __post_init__(self):
        where = f"job {self.id!r}"
        if (self.image is None) == (self.video is None):
            raise JobError(f"{where}: give exactly one of image or video")
        if len(self.audio) not in (1, 2):
            raise JobError(f"{where}: audio must be one track or two (one per speaker), got {len(self.audio)}")
        if self.audio_type not in AUDIO_TYPES:
            raise JobError(f"{where}: audio_type {self.audio_type!r} is not one of {list(AUDIO_TYPES)}")
        if self.boxes is not None and len(self.boxes) != len(self.audio):
            raise JobError(f"{where}: {len(self.boxes)} boxes for {len(self.audio)} speakers")
        if self.boxes is not None and len(self.audio) == 1:
            raise JobError(f"{where}: boxes are only used with two speakers")
        if not 0 <= self.seed < 2**63:
            raise JobError(f"{where}: seed {self.seed} must be in [0, 2**63)")

    @property
    def speakers(self) -> int:
        return len(self.audio)


@dataclass(frozen=True)
class RenderSettings:
    """How jobs are rendered. Defaults: the ComfyUI workflow's window (117/25) with the official
    sampler (euler, 40 steps, shift 7 at 480p) and guidance (text 5, audio 4)."""

    window: int = 117  # frames per window, 4n+1
    motion: int = 25  # frames of motion context carried into the next window, 4k+1
    scheduler: str = "euler"
    steps: int = 40
    shift: float = 7.0
    text_scale: float = 5.0
    audio_scale: float = 4.0
    apg: bool = False  # adaptive projected guidance (official momentum -0.75, norm threshold 55)
    batched_guidance: bool = False  # run the guidance passes as one batched forward
    color_match: str = "mkl"
    color_strength: float = 1.0
    size: str = "480p"  # output size bucket, by the reference image's aspect ratio
    crf: int = 18  # H.264 quality of the output

    def __post_init__(self):
        """Check every field with the pipeline's own validators, in field order; the first bad one raises
        SettingError. A field is checked in the company of the fields before it (steps against the
        scheduler, motion against the window), which are valid by then."""
        # Imported here: these modules import torch, and the CLI imports this one before it has parsed
        # its arguments (farm/config.py). pipeline.media loads only its light sizes module for this.
        from pipeline.color import METHODS
        from pipeline.media import choose_size
        from pipeline.sampler import SCHEDULERS, flow_sigmas
        from pipeline.windows import plan_windows

        _whole("window", self.window)
        with _field("window"):
            plan_windows(1, self.window, motion=1)
        _whole("motion", self.motion)
        with _field("motion"):
            plan_windows(1, self.window, self.motion)
        if self.scheduler not in SCHEDULERS:
            raise SettingError("scheduler", f"unknown scheduler {self.scheduler!r} (known: {', '.join(SCHEDULERS)})")
        with _field("steps"):
            flow_sigmas(self.scheduler, self.steps, shift=1.0)
        _finite("shift", self.shift)
        with _field("shift"):
            flow_sigmas(self.scheduler, self.steps, self.shift)
        _finite("text_scale", self.text_scale)
        _finite("audio_scale", self.audio_scale)
        for name in ("apg", "batched_guidance"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(name, f"expected true or false, got {getattr(self, name)!r}")
        if self.color_match not in METHODS:
            raise SettingError("color_match", f"{self.color_match!r} is not one of {', '.join(METHODS)}")
        _finite("color_strength", self.color_strength)
        with _field("size"):
            choose_size(1, 1, self.size)  # any source size: this checks the target
        _whole("crf", self.crf)
        low, high = CRF_RANGE
        if not low <= self.crf <= high:
            raise SettingError("crf", f"{self.crf} is not in [{low}, {high}]")


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """Turn a pipeline validator's ValueError into a SettingError for `name`."""
    try:
        yield
    except ValueError as exc:
        raise SettingError(name, str(exc)) from None


def _whole(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(name, f"expected a whole number, got {value!r}")


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingError(name, f"expected a finite number, got {value!r}")


@dataclass
class ResumeState:
    """Everything needed to continue a job after a window; small enough to write after every window."""

    next_window: int = 0
    motion_latents: "torch.Tensor | None" = None  # [16, m, h, w] clean latents opening the next window
    segments: list[str] = field(default_factory=list)  # files of the frames kept so far, in order
