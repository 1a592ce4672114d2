"""One job end to end on the tiny model, with real ffmpeg: frame counts and durations, determinism,
resume, motion chaining, step counts, video input and two speakers."""

import dataclasses
import subprocess

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pipeline import media
from pipeline.job import Box, Job, RenderSettings, ResumeState
from pipeline.models.checkpoints import Precision, load_models
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.render import OutputError, encode_job, finish_job, plan_for, render_job
from pipeline.sampler import SCHEDULERS
from pipeline.windows import frames_for_duration

FAST = RenderSettings(window=33, motion=9, steps=2, size="64x64")  # 3 guidance passes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return load_models(paths, Precision(dit="fp32", t5="fp32", clip="fp32", vae="fp32"))


@pytest.fixture(scope="module")
def face(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("face") / "face.png"
    Image.fromarray(skimage.data.astronaut()[0:256, 96:352]).save(path)
    return str(path)


def speech(path, seconds: float, frequency: int = 220, rate: int = 44100) -> str:
    """A stereo 44.1 kHz tone with a syllable-rate envelope, written by ffmpeg."""
    expr = f"0.5*sin(2*PI*{frequency}*t)*(0.6+0.4*sin(2*PI*4*t))"
    subprocess.run(
        [media.ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         f"aevalsrc={expr}|{expr}:s={rate}:d={seconds}", str(path)],
        check=True,
    )
    return str(path)


def run(models, job, settings, tmp_path, **kwargs):
    inputs = encode_job(models, job, settings)
    state = render_job(models, job, inputs, settings, tmp_path / "work", **kwargs)
    out = finish_job(job, state, inputs, tmp_path / "out.mp4", tmp_path / "work")
    return inputs, state, out


def decoded(path) -> torch.Tensor:
    return media.read_video_frames(path, fps=None)


@pytest.mark.parametrize("seconds, settings", [
    (0.5, FAST),
    (4.68, RenderSettings(steps=1, text_scale=1, audio_scale=1, size="64x64")),  # one 117-frame window
    (4.7, FAST),
    (20.0, RenderSettings(steps=1, text_scale=1, audio_scale=1, size="64x64")),
])
def test_frame_count_and_durations_cover_the_speech(models, face, tmp_path, seconds, settings):
    audio = speech(tmp_path / "speech.wav", seconds)
    inputs, state, out = run(models, Job("a", (audio,), image=face), settings, tmp_path)
    frames = frames_for_duration(seconds)
    assert inputs.num_frames == frames
    if seconds == 4.68:
        assert len(plan_for(frames, settings)) == 1 and plan_for(frames, settings)[0].length == 117
    info = media.probe(out)
    assert info.video.frame_count == frames
    assert (info.video.width, info.video.height) == (64, 64)
    assert abs(info.duration - frames / 25) <= 1 / 25
    assert info.audio.codec == "aac" and info.audio.sample_rate == 44100
    assert abs(info.audio.duration - seconds) <= 1 / 25  # the original audio, all of it


def test_same_seed_same_frames_and_resume_is_identical(models, face, tmp_path):
    audio = speech(tmp_path / "speech.wav", 2.5)
    job = Job("a", (audio,), image=face, seed=7)
    inputs = encode_job(models, job, FAST)
    assert len(plan_for(inputs.num_frames, FAST)) == 3

    reports = []
    full = render_job(models, job, inputs, FAST, tmp_path / "full", on_window=reports.append)
    states = [r.state for r in reports]
    assert all(r.frames is None for r in reports)  # no host copy of the frames unless asked for
    again = render_job(models, job, inputs, FAST, tmp_path / "again")
    other = render_job(models, Job("a", (audio,), image=face, seed=8), inputs, FAST, tmp_path / "other")
    # resume after window 0 from the state a crash would have left (segment 0 copied over)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    first = states[0]
    (resumed_dir / "segment-00000.mp4").write_bytes(open(first.segments[0], "rb").read())
    start = ResumeState(first.next_window, first.motion_latents.clone(), [str(resumed_dir / "segment-00000.mp4")])
    resumed = render_job(models, job, inputs, FAST, resumed_dir, state=start)

    for a, b, c in zip(full.segments, again.segments, resumed.segments):
        assert open(a, "rb").read() == open(b, "rb").read() == open(c, "rb").read()
    assert not torch.equal(decoded(full.segments[1]), decoded(other.segments[1]))


def test_motion_latents_are_the_encoding_of_the_last_colour_matched_frames(models, face, tmp_path):
    audio = speech(tmp_path / "speech.wav", 2.5)
    job = Job("a", (audio,), image=face)
    inputs = encode_job(models, job, FAST)
    reports, dit_inputs = [], []
    hook = models.dit.register_forward_pre_hook(lambda m, args: dit_inputs.append(args[0].clone()))
    try:
        render_job(models, job, inputs, FAST, tmp_path / "work", on_window=reports.append, keep_frames=True)
    finally:
        hook.remove()

    vae = models.vae.module
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    calls_per_window = FAST.steps * 3
    for k in range(len(reports) - 1):
        last = reports[k].frames[-FAST.motion :]  # window k's colour-matched frames, as decoded
        mu = vae.encode(last.transpose(0, 1)[None]).latent_dist.mean
        expected = ((mu - mean) / std)[0]  # [16, 3, h, w]
        torch.testing.assert_close(reports[k].state.motion_latents, expected, rtol=1e-5, atol=1e-5)
        # and that is what window k+1's every model call sees as its first latent frames
        for x in dit_inputs[(k + 1) * calls_per_window : (k + 2) * calls_per_window]:
            torch.testing.assert_close(x[0, :, : expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler", [s for s in SCHEDULERS if s != "flowmatch_distill"])
def test_the_steps_asked_for_are_the_steps_run(models, face, tmp_path, scheduler):
    audio = speech(tmp_path / "speech.wav", 0.5)
    settings = RenderSettings(window=33, motion=9, steps=6, scheduler=scheduler, size="64x64", text_scale=1, audio_scale=1)
    calls = []
    hook = models.dit.register_forward_pre_hook(lambda m, args: calls.append(float(args[1][0])))
    try:
        run(models, Job("a", (audio,), image=face), settings, tmp_path)
    finally:
        hook.remove()
    assert len(calls) == 6  # one window, one pass, six steps
    assert calls == sorted(calls, reverse=True) and calls[0] > 900


def test_each_window_reports_its_stages_and_every_step(models, face, tmp_path):
    audio = speech(tmp_path / "speech.wav", 2.4)  # 60 frames: 3 windows of 33/9
    job, settings = Job("a", (audio,), image=face), dataclasses.replace(FAST, steps=3)
    reports = []
    run(models, job, settings, tmp_path, on_window=reports.append)
    assert [r.window.index for r in reports] == [0, 1, 2]
    for report in reports:
        last = report.window.index == len(reports) - 1
        expected = {"conditioning", "dit", "decode", "color", "to_host", "segment"} | (set() if last else {"motion"})
        assert set(report.stages) == expected, report.stages  # the last window encodes no motion for a next one
        assert all(seconds > 0 for seconds in report.stages.values()), report.stages
        assert len(report.steps) == 3 and all(s > 0 for s in report.steps)
        assert sum(report.steps) == pytest.approx(report.stages["dit"])
        assert report.memory == {}  # the CPU: torch counts no peaks


def test_video_input_conditions_each_window_on_the_source_frame_at_its_start(models, tmp_path):
    # a 30 fps source whose every frame has its own grey level; resampled to 25 fps by the pipeline
    source = tmp_path / "source.mp4"
    frames = [np.full((48, 64, 3), 8 * i, dtype=np.uint8) for i in range(30)]
    media.write_video(source, iter(frames), fps=30, crf=0)
    audio = speech(tmp_path / "speech.wav", 2.5)
    job = Job("v", (audio,), video=str(source))
    inputs, state, out = run(models, job, FAST, tmp_path)
    plan = plan_for(inputs.num_frames, FAST)
    at_25 = media.read_video_frames(source, fps=25)  # 25 frames
    assert len(inputs.references) == len(plan) == 3
    for window, ref in zip(plan, inputs.references):
        source_frame = at_25[min(window.start, len(at_25) - 1)]
        assert abs(ref.mean() - source_frame.mean()) < 0.02, (window.start, ref.mean(), source_frame.mean())
    assert plan[2].start >= len(at_25)  # this window starts past the video: it gets the last frame
    assert media.probe(out).video.frame_count == inputs.num_frames


@pytest.mark.parametrize("audio_type", ["para", "add"])
def test_two_speakers_render(models, face, tmp_path, audio_type):
    one = speech(tmp_path / "one.wav", 1.0, 220)
    two = speech(tmp_path / "two.wav", 1.4, 330)
    boxes = (Box(0, 0, 128, 256), Box(128, 0, 256, 256))
    job = Job("duo", (one, two), image=face, audio_type=audio_type, boxes=boxes)
    inputs, state, out = run(models, job, FAST, tmp_path)
    seconds = 2.4 if audio_type == "add" else 1.4
    assert inputs.num_frames == frames_for_duration(seconds)
    assert inputs.audio.shape[0] == 2 and inputs.masks.shape == (3, 64, 64)
    assert inputs.masks[0, :, :30].all() and not inputs.masks[0, :, 34:].any()  # left half speaks first
    info = media.probe(out)
    assert info.video.frame_count == inputs.num_frames
    assert abs(info.audio.duration - seconds) <= 1 / 25


def test_batched_guidance_equals_unbatched(models, face, tmp_path):
    audio = speech(tmp_path / "speech.wav", 0.5)
    job = Job("a", (audio,), image=face)
    out = {}
    for batched in (False, True):
        settings = RenderSettings(window=33, motion=9, steps=2, size="64x64", batched_guidance=batched)
        reports = []
        inputs = encode_job(models, job, settings)
        render_job(models, job, inputs, settings, tmp_path / str(batched), on_window=reports.append, keep_frames=True)
        out[batched] = reports[0].frames
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)


def test_bad_box_is_refused_naming_the_job(models, face, tmp_path):
    one = speech(tmp_path / "one.wav", 0.5)
    job = Job("duo", (one, one), image=face, boxes=(Box(0, 0, 300, 10), Box(0, 0, 10, 10)))
    with pytest.raises(ValueError, match=r"job 'duo' speaker 1: box .* right <= 256"):
        encode_job(models, job, FAST)


def test_finish_job_verifies_what_it_wrote(models, face, tmp_path):
    """A finished video whose frames do not match the job (here: the inputs claim 5 frames more than
    were rendered) is refused with every problem named, not published."""
    job = Job("short", (speech(tmp_path / "speech.wav", 0.5),), image=face)
    inputs = encode_job(models, job, FAST)
    state = render_job(models, job, inputs, FAST, tmp_path / "work")
    wrong = dataclasses.replace(inputs, num_frames=inputs.num_frames + 5)
    with pytest.raises(OutputError, match=rf"out.mp4: output failed verification: {inputs.num_frames} frames, "
                                          rf"expected {inputs.num_frames + 5}; duration .* s, expected .* s"):
        finish_job(job, state, wrong, tmp_path / "out.mp4", tmp_path / "work")
