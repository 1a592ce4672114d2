"""pipeline.media against a real ffmpeg (PATH or imageio-ffmpeg), on inputs made here by ffmpeg and Pillow."""

import math
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import media
from pipeline.media import MediaError
from pipeline.windows import frames_for_duration, plan_windows

TONE_S = 1.37  # length of the generated tone files
TONE_HZ = 440
CLIP_FRAMES = 45  # grey-counter clip: 45 frames at 30 fps, frame j filled with grey 4 + 5j


def ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True, stdin=subprocess.DEVNULL)


def tone(path, seconds: float, rate: int = 44100, channels: int = 2) -> str:
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}:sample_rate={rate}:duration={seconds}",
           "-ac", str(channels), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    out = {ext: tone(d / f"tone.{ext}", TONE_S) for ext in ("wav", "mp3", "m4a", "flac", "ogg")}
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=2", "-f", "lavfi", "-i",
           f"sine=frequency={TONE_HZ}:sample_rate=44100:duration=2.3", "-ac", "2", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", "-c:a", "aac", str(d / "av.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30:duration=1", "-c:v", "libx264", str(d / "silent.mp4"))
    ffmpeg("-display_rotation", "90", "-i", str(d / "silent.mp4"), "-c", "copy", str(d / "rotated.mp4"))
    # Frame j is a flat grey 4 + 5j, encoded losslessly, so the frame order can be read back exactly.
    greys = b"".join(np.full((32, 32, 3), 4 + 5 * j, np.uint8).tobytes() for j in range(CLIP_FRAMES))
    subprocess.run([media.ffmpeg_binary(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", "32x32", "-r", "30", "-i", "-", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p",
                    str(d / "counter30.mp4")], input=greys, check=True)
    (d / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    out.update(av=str(d / "av.mp4"), silent=str(d / "silent.mp4"), rotated=str(d / "rotated.mp4"),
               counter=str(d / "counter30.mp4"), junk=str(d / "junk.mp4"), dir=d)
    return out


def one_line(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return np.argmax(spectrum) * rate / len(samples)


# ---------------------------------------------------------------------------------------------------------
# ffmpeg and probing
# ---------------------------------------------------------------------------------------------------------


def test_ffmpeg_binary_falls_back_to_imageio_ffmpeg(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = media.ffmpeg_binary()
    assert os.access(binary, os.X_OK)
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    assert media.ffmpeg_binary() == str(fake)  # PATH first


def test_probe_without_ffprobe(files, monkeypatch, tmp_path):
    # A PATH with no ffmpeg and no ffprobe: ffmpeg comes from imageio-ffmpeg, which ships no ffprobe.
    monkeypatch.setenv("PATH", str(tmp_path))
    import shutil

    assert shutil.which("ffprobe") is None

    av = media.probe(files["av"])
    assert av.video is not None and av.audio is not None
    assert (av.video.codec, av.video.width, av.video.height, av.video.fps, av.video.frame_count) == (
        "h264", 320, 240, 30.0, 60)
    assert (av.audio.codec, av.audio.sample_rate, av.audio.channels) == ("aac", 44100, 2)
    assert av.audio.sample_count == round(2.3 * 44100)
    assert av.duration == pytest.approx(2.3, abs=0.011)

    for ext in ("wav", "mp3", "m4a", "flac", "ogg"):
        info = media.probe(files[ext])
        assert info.video is None and info.has_audio, ext
        assert (info.audio.sample_rate, info.audio.channels) == (44100, 2), ext
        assert info.audio.sample_count == round(TONE_S * 44100), ext  # encoder delay/padding removed

    silent = media.probe(files["silent"])
    assert not silent.has_audio and silent.video.frame_count == 30 and silent.frame_size() == (48, 64)
    with pytest.raises(MediaError, match="no video stream"):
        media.probe(files["wav"]).frame_size()
    rotated = media.probe(files["rotated"])
    assert (rotated.video.width, rotated.video.height, rotated.video.rotation) == (48, 64, 90)


def test_probe_errors(files, tmp_path):
    with pytest.raises(MediaError, match="cannot read") as e:
        media.probe(files["junk"])
    one_line(e, files["junk"])
    with pytest.raises(MediaError, match="no such file") as e:
        media.probe(tmp_path / "missing.wav")
    one_line(e, tmp_path / "missing.wav")


# ---------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "mp3", "m4a", "flac", "ogg"])
def test_read_audio_containers(files, ext):
    samples = media.read_audio(files[ext])
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - TONE_S * 16000) <= 1
    assert dominant_hz(samples, 16000) == pytest.approx(TONE_HZ, abs=2)  # really 16 kHz
    assert 0.05 < np.abs(samples).max() <= 1.0

    stereo = media.read_audio(files[ext], sample_rate=None, mono=False)
    assert stereo.shape == (2, round(TONE_S * 44100))
    np.testing.assert_allclose(stereo.mean(axis=0), media.read_audio(files[ext], sample_rate=None), atol=1e-6)


def test_read_audio_of_a_video(files):
    samples = media.read_audio(files["av"])
    assert abs(len(samples) - 2.3 * 16000) <= 1
    assert dominant_hz(samples, 16000) == pytest.approx(TONE_HZ, abs=2)


def test_read_audio_errors(files):
    with pytest.raises(MediaError, match="no audio stream") as e:
        media.read_audio(files["silent"])
    one_line(e, files["silent"])
    with pytest.raises(MediaError, match="cannot read") as e:
        media.read_audio(files["junk"])
    one_line(e, files["junk"])


# ---------------------------------------------------------------------------------------------------------
# Video frames
# ---------------------------------------------------------------------------------------------------------


def grey_index(frames: torch.Tensor) -> list[int]:
    levels = (frames.mean(dim=(1, 2, 3)) + 1) * 127.5
    return [round((float(v) - 4) / 5) for v in levels]


def test_read_video_resamples_30_to_25_fps(files):
    frames = media.read_video_frames(files["counter"])
    # ffmpeg's fps filter puts source frame j in output slot round(j * 25/30) (halves up); each output frame
    # is the last source frame in or before its slot.
    slot = [math.floor(j * 25 / 30 + 0.5) for j in range(CLIP_FRAMES)]
    expected = [max(j for j in range(CLIP_FRAMES) if slot[j] <= k) for k in range(slot[-1] + 1)]
    assert len(expected) == 38 == round(CLIP_FRAMES / 30 * 25 + 1e-9)
    assert frames.shape == (38, 3, 32, 32) and frames.dtype == torch.float32
    assert grey_index(frames) == expected
    assert media.video_frame_count(files["counter"]) == 38
    assert media.video_frame_count(files["counter"], fps=None) == CLIP_FRAMES

    part = media.read_video_frames(files["counter"], start=10, count=5)
    assert grey_index(part) == expected[10:15]
    torch.testing.assert_close(part, frames[10:15])
    assert grey_index(media.read_video_frames(files["counter"], fps=None, count=3)) == [0, 1, 2]
    assert len(list(media.iter_video_frames(files["counter"], start=30))) == 1  # one chunk of 8

    # Chosen frames, in the order asked, repeats allowed, past the end -> the last frame.
    picked = media.read_video_frames(files["counter"], indices=[5, 0, 5, 37, 500])
    assert grey_index(picked) == [expected[5], expected[0], expected[5], expected[37], expected[37]]


def test_read_video_size_and_rotation(files):
    frames = media.read_video_frames(files["rotated"])
    assert frames.shape == (25, 3, 64, 48)  # shown upright
    fitted = media.read_video_frames(files["av"], size=(48, 80), count=2)
    assert fitted.shape == (2, 3, 48, 80)
    torch.testing.assert_close(fitted, media.fit_to(media.read_video_frames(files["av"], count=2), 48, 80))
    with pytest.raises(MediaError, match="no video stream"):
        media.read_video_frames(files["wav"])


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def pixel(image: torch.Tensor, y: int, x: int) -> list[int]:
    return [round((float(v) + 1) * 127.5) for v in image[:, y, x]]


def test_read_image_alpha_over_white(tmp_path):
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red
    rgba[:, 4:8] = (255, 0, 0, 128)  # half transparent red
    rgba[:, 8:] = (0, 0, 0, 0)  # transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = media.read_image(tmp_path / "a.png")
    assert image.shape == (3, 8, 12) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert pixel(image, 0, 0) == [255, 0, 0]
    assert pixel(image, 0, 5) == [255, 127, 127]
    assert pixel(image, 0, 10) == [255, 255, 255]
    assert pixel(media.read_image(tmp_path / "a.png", background=(0, 0, 0)), 0, 10) == [0, 0, 0]

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.info["transparency"] = 1
    palette.save(tmp_path / "p.png", transparency=1)
    assert pixel(media.read_image(tmp_path / "p.png"), 1, 1) == [255, 255, 255]


def test_read_image_16_bit(tmp_path):
    grey = np.full((6, 5), 32768, np.uint16)
    grey[0, 0] = 65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = media.read_image(tmp_path / "g16.png")
    assert image.shape == (3, 6, 5)
    assert float(image[0, 1, 1]) == pytest.approx(32768 / 65535 * 2 - 1, abs=1e-6)  # mid grey, not clipped
    assert float(image[0, 0, 0]) == pytest.approx(1.0)

    # 16-bit RGB (Pillow cannot write one; ffmpeg packs these raw 16-bit samples into a PNG unchanged).
    rgb48 = np.tile(np.array([0x3380, 0x6600, 0x99FF], "<u2"), (4, 8, 1))
    subprocess.run([media.ffmpeg_binary(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb48le",
                    "-s", "8x4", "-i", "-", "-pix_fmt", "rgb48be", str(tmp_path / "rgb16.png")],
                   input=rgb48.tobytes(), check=True)
    got = pixel(media.read_image(tmp_path / "rgb16.png"), 1, 1)
    assert all(abs(a - b) <= 1 for a, b in zip(got, [0x33, 0x66, 0x99])), got


def test_read_image_cmyk_webp_and_exif(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert all(abs(a - b) <= 2 for a, b in zip(pixel(media.read_image(tmp_path / "c.jpg"), 8, 8), [255, 0, 0]))

    Image.new("RGB", (10, 6), (10, 200, 30)).save(tmp_path / "w.webp", lossless=True)
    assert pixel(media.read_image(tmp_path / "w.webp"), 3, 3) == [10, 200, 30]

    # Stored 40 wide x 20 high, left half red, right half blue; EXIF orientation 6 = shown turned 90 degrees
    # clockwise, so upright it is 20 wide x 40 high with the red half on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=100)
    upright = media.read_image(tmp_path / "r.jpg")
    assert upright.shape == (3, 40, 20)
    assert pixel(upright, 5, 10)[0] > 240 and pixel(upright, 35, 10)[2] > 240


def test_read_image_falls_back_to_ffmpeg_and_errors(files, tmp_path):
    ffmpeg("-f", "lavfi", "-i", "color=c=0x204060:size=16x8", "-frames:v", "1", str(tmp_path / "f.y4m"))
    image = media.read_image(tmp_path / "f.y4m")  # not a format Pillow identifies
    assert image.shape == (3, 8, 16)
    assert all(abs(a - b) <= 3 for a, b in zip(pixel(image, 4, 8), [0x20, 0x40, 0x60]))
    with pytest.raises(MediaError, match="not an image") as e:
        media.read_image(files["junk"])
    one_line(e, files["junk"])


# ---------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------


def test_choose_size():
    assert media.choose_size(1080, 1920) == (480, 832)  # landscape 16:9
    assert media.choose_size(1920, 1080) == (832, 480)  # portrait 9:16
    assert media.choose_size(1000, 1000) == (640, 640)  # square
    assert media.choose_size(480, 640) == (576, 704)  # 4:3: the official bucket
    assert media.choose_size(1080, 1920, target="720p") == (720, 1280)
    # The official tables verbatim: 16:9 -> the 0.50 bucket, 9:16 -> the 1.86 one.
    assert media.choose_size(1080, 1920, target="infinitetalk-480") == (448, 896)
    assert media.choose_size(1920, 1080, target="infinitetalk-480") == (832, 448)
    assert media.choose_size(1000, 1000, target="infinitetalk-720") == (960, 960)
    assert media.choose_size(300, 900, target=[(480, 832), (640, 640)]) == (480, 832)
    with pytest.raises(ValueError, match="unknown size target"):
        media.choose_size(10, 10, target="1080p")


def test_fit_to_covers_and_centre_crops():
    # A square source into a landscape target: scaled to 832x832, then 176 rows cut from the top and bottom.
    rows = torch.linspace(-1, 1, 1000).view(1, 1000, 1).expand(3, 1000, 1000)
    out = media.fit_to(rows, 480, 832)
    assert out.shape == (3, 480, 832)
    centre = float(out[0, 240, 416])
    assert centre == pytest.approx(0.0, abs=0.01)  # the centre stays the centre
    first_row_in_source = (176 + 0.5) / 0.832 - 0.5
    assert float(out[0, 0, 0]) == pytest.approx(-1 + 2 * first_row_in_source / 999, abs=0.01)

    landscape = torch.rand(2, 3, 1080, 1920) * 2 - 1
    assert media.fit_to(landscape, 480, 832).shape == (2, 3, 480, 832)
    portrait = torch.rand(3, 1920, 1080).to(torch.bfloat16)
    out = media.fit_to(portrait, 832, 480)
    assert out.shape == (3, 832, 480) and out.dtype == torch.bfloat16
    same = torch.rand(3, 480, 832)
    assert torch.equal(media.fit_to(same, 480, 832), same)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def gradient_frames(n: int, height: int = 48, width: int = 64) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / max(n, 1)
    x = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    return (x * 0.8 + t * 0.2).expand(n, 3, height, width).clone()


@pytest.mark.parametrize("seconds", [0.5, 4.68, 4.7, 20.0])
def test_write_video_covers_the_audio(files, seconds, tmp_path):
    audio = tone(tmp_path / "speech.wav", seconds)
    frames = frames_for_duration(seconds)
    assert frames == math.ceil(round(seconds * 25, 6))
    out = tmp_path / "out.mp4.partial"  # written to this exact name, whatever the suffix
    video = gradient_frames(frames)
    # Long ones as an iterator of uint8 chunks, short ones as one tensor.
    source = (video if seconds < 10 else
              (((c + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for c in video.split(40)))
    assert media.write_video(out, source, audio_path=audio) == frames

    info = media.probe(out)
    assert (info.video.codec, info.video.pix_fmt, info.video.fps) == ("h264", "yuv420p", 25.0)
    assert info.video.frame_count == frames == media.video_frame_count(out)
    assert frames / 25 >= seconds and frames / 25 - seconds < 1 / 25  # the video covers all of the audio
    # The original track (44.1 kHz stereo), not a 16 kHz copy, as long as the input within a frame.
    assert (info.audio.codec, info.audio.sample_rate, info.audio.channels) == ("aac", 44100, 2)
    assert abs(info.audio.duration - seconds) < 1 / 25
    assert abs(info.duration - frames / 25) < 1 / 25


def test_write_video_colours_odd_size_and_audio_start(files, tmp_path):
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], dtype=torch.float32)
    frame = (colours / 127.5 - 1).view(4, 3, 1, 1).repeat_interleave(16, dim=2)  # 4 bands of 16 rows
    frame = frame.permute(1, 0, 2, 3).reshape(3, 64, 1).expand(3, 64, 33)  # odd width
    out = tmp_path / "c.mp4"
    audio = tone(tmp_path / "a.wav", 4.7)
    assert media.write_video(out, [frame, frame[None].expand(92, 3, 64, 33)], audio_path=audio,
                             audio_start=1.0) == 93
    back = media.read_video_frames(out)
    assert back.shape == (93, 3, 64, 32)
    for band, rgb in enumerate(colours):
        got = pixel(back[0], band * 16 + 8, 16)
        assert all(abs(a - b) <= 6 for a, b in zip(got, rgb.tolist())), (band, got)
    assert abs(media.probe(out).audio.duration - 3.7) < 1 / 25


def colour_tags(path) -> str:
    """The video stream's '(range, tags' as ffmpeg's stream dump prints them: one name when matrix,
    primaries and transfer agree, else matrix/primaries/transfer ('unknown' where untagged)."""
    dump = subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return dump.split("yuv420p(", 1)[1].split(", progressive")[0]


def test_outputs_are_tagged_bt709(tmp_path):
    segments = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for segment in segments:
        media.write_video(segment, gradient_frames(5))
    media.concat_segments(segments, tone(tmp_path / "t.wav", 0.4), tmp_path / "out.mp4")
    for path in [*segments, tmp_path / "out.mp4"]:
        assert colour_tags(path) == "tv, bt709", path  # untagged primaries: 'tv, bt709/unknown/unknown'


def test_write_video_errors(files, tmp_path):
    out = tmp_path / "e.mp4"
    with pytest.raises(MediaError, match="no audio stream") as e:
        media.write_video(out, gradient_frames(3), audio_path=files["silent"])
    one_line(e, files["silent"])
    with pytest.raises(MediaError, match="ffmpeg exit") as e:
        media.write_video(out, gradient_frames(3), preset="no-such-preset")
    one_line(e, out)
    assert not out.exists()
    with pytest.raises(MediaError, match="frame size changed"):
        media.write_video(out, [gradient_frames(2), gradient_frames(2, width=32)])
    assert not out.exists()


def video_packets(path) -> list[tuple[int, int, int]]:
    """(dts, pts, duration) of every video packet in decode order, in the stream's time base (framecrc)."""
    report = subprocess.run([media.ffmpeg_binary(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                             "-f", "framecrc", "-"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(",") for line in report.splitlines() if line and not line.startswith("#")]
    return [(int(r[1]), int(r[2]), int(r[3])) for r in rows]


@pytest.mark.parametrize("frames, window, motion", [
    *((33 + tail, 33, 9) for tail in range(1, 25)),  # the tiny model's windows: every tail size after one window
    (34 + 24, 33, 9), (118, 117, 25), (119, 117, 25), (117 + 92 + 1, 117, 25), (117 + 92 + 46, 117, 25),
])
def test_joined_segments_have_a_constant_25_fps_timeline(tmp_path, frames, window, motion):
    segments = []
    for w in plan_windows(frames, window, motion):  # each window's new frames, as render_job writes them
        new = min(w.length, frames - w.start) - w.new_from
        segments.append(tmp_path / f"segment-{w.index}.mp4")
        media.write_video(segments[-1], torch.rand(new, 3, 16, 16) * 2 - 1)
    out = tmp_path / "out.mp4"
    assert media.concat_segments(segments, None, out) == frames
    packets = video_packets(out)
    tick = packets[1][0] - packets[0][0]  # one frame in the stream's time base
    assert [dts for dts, _, _ in packets] == [packets[0][0] + i * tick for i in range(frames)]
    assert {duration for _, _, duration in packets} == {tick}
    pts = sorted(p for _, p, _ in packets)
    assert pts == [pts[0] + i * tick for i in range(frames)] and all(dts <= p for dts, p, _ in packets)
    dump = subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert ", 25 fps," in dump  # avg_frame_rate 25/1 (a 3-frame packet made it 23.61 fps)


def test_concat_segments_and_combine_audio(tmp_path):
    first = tone(tmp_path / "one.wav", 3.1)
    second = tone(tmp_path / "two.wav", 1.3, rate=16000, channels=1)
    para = media.probe(media.combine_audio([first, second], "para", tmp_path / "para.wav")).audio
    assert (para.sample_rate, para.channels) == (44100, 2) and para.duration == pytest.approx(3.1, abs=1e-3)
    add = media.probe(media.combine_audio([first, second], "add", tmp_path / "add.flac")).audio
    assert add.duration == pytest.approx(4.4, abs=1e-3)

    # Window segments of flat greys, joined without re-encoding, with the combined audio (4.4 s -> 110 frames).
    lengths = [13, 46, 46, 5]
    assert sum(lengths) == frames_for_duration(add.duration)
    segments = []
    for i, n in enumerate(lengths):
        segments.append(tmp_path / f"segment-{i}.mp4")
        media.write_video(segments[-1], torch.full((n, 3, 48, 64), -0.9 + 0.5 * i))
    out = tmp_path / "joined.mp4"
    assert media.concat_segments(segments, tmp_path / "add.flac", out) == 110
    info = media.probe(out)
    assert (info.video.frame_count, info.audio.codec, info.audio.sample_rate) == (110, "aac", 44100)
    assert abs(info.audio.duration - 4.4) < 1 / 25 and abs(info.duration - 4.4) < 1 / 25
    levels = media.read_video_frames(out).mean(dim=(1, 2, 3))
    expected = torch.cat([torch.full((n,), -0.9 + 0.5 * i) for i, n in enumerate(lengths)])
    assert torch.allclose(levels, expected, atol=0.02)
