"""One job end to end: encode once, render window after window, finish into an mp4.

    encode_job   audio -> -23 LUFS -> wav2vec2 features; prompts -> T5; reference frame(s) -> CLIP
    render_job   for each window: audio slice, noise from (seed, window), sample with clean motion
                 latents, decode, colour-match, encode the last M frames as the next window's motion
                 latents, and write the window's new frames as a segment (on another thread, while the
                 device renders the next window) -> ResumeState
    finish_job   segments + the ORIGINAL audio -> H.264/AAC mp4

The state after a window is small and explicit (ResumeState): the next window's index, its motion
latents and the segment files written so far. Noise is drawn from a generator seeded by (job seed,
window index), so a job resumed at window k produces the same frames as an uninterrupted run.
"""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline import media
from pipeline.ahead import run_ahead
from pipeline.color import match_colors
from pipeline.job import FPS, Job, RenderSettings, ResumeState
from pipeline.models.audio import SAMPLE_RATE, AudioEncoder, feature_frames, loudness_normalize
from pipeline.models.checkpoints import Models
from pipeline.models.dit import pad_text
from pipeline.models.vae import latent_frames
from pipeline.sampler import APG, COND, DROP_AUDIO, DROP_TEXT, guidance_passes, guide, make_sampler
from pipeline.speakers import arrange_speakers, speaker_masks
from pipeline.timing import StageClock
from pipeline.windows import Window, frames_for_duration, pad_features, plan_windows, total_frames, window_audio

log = logging.getLogger(__name__)


@dataclass
class JobInputs:
    """What the window loop needs from the encoders, computed once per job (on any machine: it holds
    tensors only, on the CPU)."""

    num_frames: int  # video frames covering the whole speech, ceil(duration * 25)
    text: torch.Tensor  # [1, text_len, text_dim] the prompt's T5 tokens, zero-padded
    text_null: torch.Tensor  # [1, text_len, text_dim] the negative prompt's
    audio: torch.Tensor  # [S, frames + pad, layers, C] wav2vec2 features (speech_features), padded past the end
    references: torch.Tensor  # [R, 3, H, W] in [-1, 1]: R = 1 for an image, one per window for a video
    clip_tokens: torch.Tensor  # [R, 257, clip_dim]
    masks: torch.Tensor | None  # [3, H, W] speaker 1 / speaker 2 / background; two speakers only


@dataclass(frozen=True)
class WindowReport:
    """Passed to `on_window` after each window, with the state that resumes after it."""

    window: Window
    windows: int  # how many windows the job has
    timesteps: tuple[float, ...]
    state: ResumeState
    stages: dict[str, float]  # seconds per stage: the device's (StageClock: conditioning when encoded, dit,
    # decode, color, to_host, motion), then segment (x264, beside the device's next window)
    steps: tuple[float, ...]  # seconds of each sampling step (their sum is stages["dit"])
    memory: dict[str, int]  # the device's peak_allocated and peak_reserved bytes during the window (CUDA only)
    frames: torch.Tensor | None = None  # with keep_frames: [T, 3, H, W] all the decoded, colour-matched frames, on the CPU


def window_seed(seed: int, window: int, stream: int) -> int:
    """A distinct, stable 63-bit seed per (job seed, window, stream) - no RNG state to carry."""
    mixed = (seed * 0x9E3779B97F4A7C15 + window * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    return mixed >> 1


# ---------------------------------------------------------------------------------------------- encode


def plan_for(num_frames: int, settings: RenderSettings) -> list[Window]:
    return plan_windows(num_frames, settings.window, settings.motion)


def speech_features(encoder: AudioEncoder, track: np.ndarray, frames_needed: int) -> torch.Tensor:
    """[frames_needed + pad, layers, C] features of one speaker's track (16 kHz, loudness-normalised), on
    the CPU in fp32: computed on the official grid (feature_frames), then padded past the end as the
    windows need (pad_features), which gives the frame that ceil(duration x 25) adds the tail treatment."""
    features = encoder.features(torch.from_numpy(track), feature_frames(len(track)))
    return pad_features(features.cpu().float(), frames_needed)


@torch.no_grad()
def encode_job(models: Models, job: Job, settings: RenderSettings) -> JobInputs:
    """Audio, text and reference encodings of one job (wav2vec2, T5 and CLIP; no DiT, no VAE)."""
    tracks = [loudness_normalize(media.read_audio(path, SAMPLE_RATE), SAMPLE_RATE) for path in job.audio]
    tracks = arrange_speakers(tracks, job.audio_type)
    num_frames = frames_for_duration(len(tracks[0]) / SAMPLE_RATE)
    plan = plan_for(num_frames, settings)
    features = [speech_features(models.wav2vec, track, total_frames(plan)) for track in tracks]

    prompt, negative = models.t5.encode([job.prompt, job.negative_prompt])
    text_len = models.t5.text_len

    references, (source_h, source_w) = reference_frames(job, plan, settings)
    height, width = references.shape[-2:]
    clip_tokens = models.clip.encode(references).cpu().float()
    masks = None
    if job.speakers == 2:
        masks = speaker_masks(job.boxes, source_h, source_w, height, width, f"job {job.id!r}")
    return JobInputs(
        num_frames=num_frames,
        text=pad_text([prompt.cpu().float()], text_len),
        text_null=pad_text([negative.cpu().float()], text_len),
        audio=torch.stack(features),
        references=references,
        clip_tokens=clip_tokens,
        masks=masks,
    )


def reference_frames(job: Job, plan: list[Window], settings: RenderSettings) -> tuple[torch.Tensor, tuple[int, int]]:
    """([R, 3, H, W], the source's (height, width)): the image, or for a video the source frame at each
    window's start (the video resampled to 25 fps; its last frame for windows that start past its end)."""
    if job.image is not None:
        frames = media.read_image(job.image)[None]
    else:
        frames = media.read_video_frames(job.video, fps=FPS, indices=[w.start for w in plan])  # clamped to the end
    source = tuple(frames.shape[-2:])
    height, width = media.choose_size(*source, settings.size)
    return media.fit_to(frames, height, width), source


# ---------------------------------------------------------------------------------------------- render


class WindowRenderer:
    """The per-window machinery of one job: conditioning, guided velocity, sampling, decode."""

    def __init__(self, models: Models, inputs: JobInputs, settings: RenderSettings, seed: int):
        self.dit, self.vae = models.dit, models.vae
        self.inputs, self.settings, self.seed = inputs, settings, seed
        self.device = self.dit.patch_embedding.weight.device  # outside the blocks: never offloaded
        self.dtype = self.dit.patch_embedding.weight.dtype
        self.passes = guidance_passes(settings.text_scale, settings.audio_scale)
        self.sde_generator = torch.Generator().manual_seed(window_seed(seed, 0, 1))
        self.sampler = make_sampler(settings.scheduler, settings.steps, settings.shift, self.sde_generator)
        self._conditioning: dict[int, torch.Tensor] = {}  # reference index -> VAE latent of [ref, zeros]

    def conditioning(self, ref_index: int, length: int) -> torch.Tensor:
        """[1, 20, F, h, w]: the first-frame mask (4 channels) and the VAE latent of [reference, zeros].

        The VAE is causal, so the latent of a shorter window is a prefix of the full window's: an
        image job encodes it once, at full window length.
        """
        if ref_index not in self._conditioning:
            ref = self.inputs.references[ref_index]
            video = torch.zeros(1, 3, max(length, self.settings.window), *ref.shape[-2:], device=self.vae.device)
            video[0, :, 0] = ref
            self._conditioning[ref_index] = self.vae.encode(video)
        latent = self._conditioning[ref_index][:, :, : latent_frames(length)]
        mask = torch.zeros_like(latent[:, :4])
        mask[:, :, 0] = 1  # pixel frame 0 is given, i.e. all 4 sub-frames of latent frame 0
        return torch.cat([mask, latent], dim=1)

    def pass_inputs(self, name: str, audio: torch.Tensor) -> dict:
        """Text, audio and masks of one guidance pass. Passes without audio use ONE silent speaker
        (as the official does even for two speakers), so they take the plain attention path."""
        with_text = name in (COND, DROP_AUDIO)
        with_audio = name in (COND, DROP_TEXT)
        return dict(
            text=self.inputs.text if with_text else self.inputs.text_null,
            audio=audio if with_audio else torch.zeros_like(audio[:, :1]),
            ref_masks=self.inputs.masks if with_audio and audio.shape[1] == 2 else None,
        )

    def velocity(self, x, t, y, clip_tokens, audio, apg) -> torch.Tensor:
        """The guided velocity at (x, t): one DiT forward per pass, or batched by speaker count."""
        args = {name: self.pass_inputs(name, audio) for name in self.passes}
        groups = [[name] for name in self.passes]
        if self.settings.batched_guidance:  # passes with the same speaker count share a forward
            by_speakers: dict[int, list[str]] = {}
            for name in self.passes:
                by_speakers.setdefault(args[name]["audio"].shape[1], []).append(name)
            groups = list(by_speakers.values())
        velocities = {}
        for group in groups:
            b = len(group)
            masks = args[group[0]]["ref_masks"]
            out = self.dit(
                x.expand(b, *x.shape[1:]).to(self.dtype),
                torch.full((b,), t, device=self.device),
                torch.cat([args[n]["text"] for n in group]).to(self.device),
                clip_tokens.expand(b, *clip_tokens.shape[1:]),
                y.expand(b, *y.shape[1:]),
                torch.cat([args[n]["audio"] for n in group]).to(self.device),
                None if masks is None else masks.to(self.device),
            )
            velocities |= {n: out[i : i + 1] for i, n in enumerate(group)}
        return guide(velocities, self.settings.text_scale, self.settings.audio_scale, apg)

    @torch.no_grad()
    def render(self, window: Window, motion: torch.Tensor, clock: StageClock) -> torch.Tensor:
        """Sample one window with `motion` ([1, 16, m, h, w], clean) fixed at its start; returns the
        decoded frames [T, 3, H, W] in [-1, 1]. Its stages are timed on `clock`."""
        ref_index = window.index if len(self.inputs.references) > 1 else 0
        with clock.stage("conditioning"):  # a VAE encode for a new reference, else a cached slice
            y = self.conditioning(ref_index, window.length).to(self.device, self.dtype)
        clip_tokens = self.inputs.clip_tokens[ref_index : ref_index + 1].to(self.device)
        audio = torch.stack([window_audio(track, window) for track in self.inputs.audio])[None].to(self.device)
        shape = (1, 16, latent_frames(window.length), *y.shape[-2:])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(window_seed(self.seed, window.index, 0)))
        self.sde_generator.manual_seed(window_seed(self.seed, window.index, 1))
        apg = APG() if self.settings.apg else None  # momentum restarts every window, as the official

        x = noise.to(self.device)
        m = motion.shape[2]
        motion = motion.to(self.device, x.dtype)
        for i, t in enumerate(self.sampler.timesteps):
            with clock.stage("dit"):  # one sampling step
                x[:, :, :m] = motion
                v = self.velocity(x, t, y, clip_tokens, audio, apg)
                x = self.sampler.step(i, x, v.to(x.dtype))
                x[:, :, :m] = motion
        with clock.stage("decode"):
            return self.vae.decode(x)[0].transpose(0, 1)  # [T, 3, H, W]


def render_windows(
    models: Models,
    job: Job,
    inputs: JobInputs,
    settings: RenderSettings,
    workdir: str | Path,
    state: ResumeState | None = None,
    keep_frames: bool = False,
    device_lock: AbstractContextManager = nullcontext(),
    on_stage: Callable[[Window, int, str, int], None] | None = None,
) -> Iterator[WindowReport]:
    """Render the job's windows from `state.next_window` on, yielding a report after each; each
    window's kept frames become a segment file in `workdir`. keep_frames: the report carries all the
    window's frames too (a host copy, 0.5 GiB at 480p; the segment files hold what the video keeps).

    The device runs ahead (pipeline.ahead): while this thread encodes window k's segment (x264, 1.6 s
    at 480p) and the caller handles its report, the device already samples window k+1. A report comes
    once its segment file is written, so its state can be stored as it is.

    device_lock is held from before the first window's device work until after the last's, not while
    the last segment is encoded: a renderer that takes its next job early passes a lock it shares with
    that job, so the next job's first window runs while this job's last segment is encoded.

    on_stage(window, windows, stage, count) is called, on the device's thread, as each of a window's timed
    stages begins (pipeline.timing.StageClock: "dit" is sampling step `count`; `windows`, the job's
    windows), for a live display."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = _holding(device_lock, _device_windows(models, job, inputs, settings, workdir, state, keep_frames, on_stage))
    for frames, report in run_ahead(device, name=f"render-{job.id}"):
        started = time.perf_counter()
        media.write_video(report.state.segments[-1], frames, fps=FPS, crf=settings.crf)
        yield replace(report, stages=report.stages | {"segment": time.perf_counter() - started})


def _holding(lock: AbstractContextManager, items: Iterator):
    with lock:
        yield from items


def _device_windows(models, job, inputs, settings, workdir, state, keep_frames, on_stage) -> Iterator[tuple[torch.Tensor, WindowReport]]:
    """render_windows' device side: per window, (its kept frames as uint8 [T, H, W, 3] on the host, its
    report); the segment the report's state names is not written yet."""
    plan = plan_for(inputs.num_frames, settings)
    state = state or ResumeState()
    renderer = WindowRenderer(models, inputs, settings, job.seed)
    colour_reference = inputs.references[0]
    motion = state.motion_latents
    for window in plan[state.next_window :]:
        clock = StageClock(renderer.device, partial(on_stage, window, len(plan)) if on_stage else None)
        if motion is None:
            # The first window opens on the reference frame itself: its latent is the first latent
            # frame of the conditioning (the VAE is causal), which the renderer encodes here.
            with clock.stage("conditioning"):
                motion = renderer.conditioning(0, window.length)[0, 4:, :1]
        frames = renderer.render(window, motion[None], clock)
        with clock.stage("color"):
            frames = match_colors(frames, colour_reference.to(frames.device), settings.color_match, settings.color_strength)

        keep = frames[window.new_from : window.new_from + min(window.new_frames, inputs.num_frames - window.start - window.new_from)]
        with clock.stage("to_host"):  # 8-bit on the device: a quarter of the bytes to copy
            keep = media.to_uint8_frames(keep).cpu()
        motion = None
        if window.index + 1 < len(plan):
            with clock.stage("motion"):
                motion = models.vae.encode(frames[-settings.motion :].transpose(0, 1)[None])[0].cpu()
        segment = workdir / f"segment-{window.index:05d}.mp4"
        state = ResumeState(window.index + 1, motion, [*state.segments, str(segment)])
        log.info("job %s: window %d/%d done (%d new frames)", job.id, window.index + 1, len(plan), len(keep))
        report = WindowReport(window, len(plan), renderer.sampler.timesteps, state, clock.seconds, tuple(clock.steps),
                              clock.peak_memory(), frames.cpu() if keep_frames else None)
        del frames  # the decoded window (0.5 GiB at 480p) leaves the GPU before the next one samples
        yield keep, report


def render_job(
    models: Models,
    job: Job,
    inputs: JobInputs,
    settings: RenderSettings,
    workdir: str | Path,
    state: ResumeState | None = None,
    on_window: Callable[[WindowReport], None] | None = None,
    keep_frames: bool = False,
) -> ResumeState:
    """`render_windows` to the end; returns the final state (its segments are the whole video)."""
    state = state or ResumeState()
    with closing(render_windows(models, job, inputs, settings, workdir, state, keep_frames)) as reports:
        for report in reports:  # closing: an error in on_window stops the device's thread at once
            state = report.state
            if on_window is not None:
                on_window(report)
    return state


def finish_job(job: Job, state: ResumeState, inputs: JobInputs, output: str | Path, workdir: str | Path) -> Path:
    """Concatenate the segments and mux the job's original audio (both speakers mixed or joined as
    the audio type says) into `output`, then verify it (`verify_output`)."""
    audio = media.combine_audio(job.audio, job.audio_type, Path(workdir) / "audio.flac") if job.speakers == 2 else job.audio[0]
    media.concat_segments(state.segments, audio, output)
    verify_output(output, inputs.num_frames)
    return Path(output)


class OutputError(RuntimeError):
    """A finished video that is not what the job asked for; the message lists every problem."""


def verify_output(path: str | Path, frames: int) -> None:
    """OutputError unless `path` has `frames` video frames and an audio stream, lasting frames / FPS
    seconds to within a frame."""
    info = media.probe(path)
    problems = []
    if info.video is None or info.video.frame_count != frames:
        problems.append(f"{info.video.frame_count if info.video else 0} frames, expected {frames}")
    if info.audio is None:
        problems.append("no audio stream")
    elif abs(info.duration - frames / FPS) > 1 / FPS:
        problems.append(f"duration {info.duration:.3f} s, expected {frames / FPS:.3f} s")
    if problems:
        raise OutputError(f"{path}: output failed verification: {'; '.join(problems)}")
