"""Decoding: still images (Pillow, ffmpeg as fallback), video frames and audio samples (ffmpeg)."""

import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import ffmpeg
import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.media.probe import _dump, video_frame_count
from pipeline.media.process import (MediaError, PathLike, _FFmpeg, _WavDecoder, _command, _input, _passthrough,
                                    _require_file, ffmpeg_binary)
from pipeline.media.sizes import fit_to
from pipeline.job import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------------------
# Still images
# --------------------------------------------------------------------------------------------------------


def read_image(path: PathLike, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """An image as [3, H, W] float32 in [-1, 1], RGB, upright.

    Pillow decodes it (PNG, JPEG, WebP and whatever else it reads; a file it cannot identify goes to ffmpeg,
    first frame). Orientation: the EXIF orientation tag is applied. Colour: an embedded ICC
    profile (RGB, RGBA or CMYK) is converted to sRGB; a CMYK JPEG without one is converted by Pillow (Adobe's
    inverted CMYK is undone). Transparency (alpha channel, palette or tRNS transparency) is composited over
    `background`, white by default: cut-out portraits then look like a studio shot, and the colour a PNG stores
    under transparent pixels (often black or garbage) never leaks in. 16-bit greyscale is scaled from 0..65535
    (Pillow's own conversion would clip it to white); 16-bit RGB(A) PNGs arrive as 8 bits per channel.
    """
    path = _require_file(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            rgb = _rgb_pixels(image, background, path)
    except Image.UnidentifiedImageError:
        try:
            return read_video_frames(path, fps=None, count=1)[0]
        except MediaError as e:
            raise MediaError(path, f"not an image Pillow or ffmpeg can read; {e.problem}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"cannot decode the image ({e})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous() * 2 - 1


def _rgb_pixels(image: Image.Image, background: tuple[int, int, int], path: Path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1], sRGB, any alpha composited over `background`."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey ("I" is how older Pillow opens it)
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1)
        return np.repeat(grey[..., None], 3, axis=2)
    image = _to_srgb(image, path)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + np.asarray(background, np.float32) / 255 * (1 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def _to_srgb(image: Image.Image, path: Path) -> Image.Image:
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        mode = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=mode)
    except (ImportError, OSError, ValueError) as e:  # ImageCms.PyCMSError is an OSError
        log.warning("%s: ignoring its ICC profile (%s)", path, e)
        return image


# --------------------------------------------------------------------------------------------------------
# Video frames
# --------------------------------------------------------------------------------------------------------


def iter_video_frames(path: PathLike, fps: float | None = FPS, size: tuple[int, int] | None = None,
                      start: int = 0, count: int | None = None, chunk: int = 16) -> Iterator[torch.Tensor]:
    """Frames of the first video stream in chunks of [<=chunk, 3, H, W] float32 in [-1, 1].

    fps: resample with ffmpeg's fps filter (frame k shows the source frame on screen at k/fps, frames dropped
    or repeated; no blending); None keeps the stored frames. start/count: a range of frames, counted after the
    resampling (ffmpeg's trim filter; ffmpeg still decodes from the beginning of the file). Frames arrive
    upright (rotation flag applied) with square pixels; size=(H, W) then applies fit_to.
    """
    path = _require_file(path)
    if _dump(path).video is None:
        raise MediaError(path, "no video stream")
    stream = _input(path)["V:0"]
    if fps is not None:
        stream = stream.filter("fps", fps=fps)
    if start > 0 or count is not None:
        stream = stream.trim(start_frame=start, **({} if count is None else {"end_frame": start + count}))
    stream = stream.filter("scale", w="round(iw*sar)", h="ih").filter("setsar", 1)
    # PPM on a pipe: every frame carries its own size, so nothing depends on parsing the stream dump.
    spec = ffmpeg.output(stream, "pipe:", format="image2pipe", vcodec="ppm", pix_fmt="rgb24",
                         **_passthrough(ffmpeg_binary()))
    return iter(()) if count is not None and count <= 0 else _decode_frames(path, _command(spec), size, chunk)


def _decode_frames(path: Path, args: list[str], size: tuple[int, int] | None,
                   chunk: int) -> Iterator[torch.Tensor]:
    proc = _FFmpeg(args, path, stdout=True)
    try:
        batch: list[np.ndarray] = []
        while (frame := _read_ppm(proc.proc.stdout, path)) is not None:
            batch.append(frame)
            if len(batch) == chunk:
                yield _frames_to_tensor(batch, size)
                batch = []
        proc.finish("decoding video")
        if batch:
            yield _frames_to_tensor(batch, size)
    finally:
        proc.kill()


def read_video_frames(path: PathLike, fps: float | None = FPS, size: tuple[int, int] | None = None,
                      start: int = 0, count: int | None = None,
                      indices: Sequence[int] | None = None) -> torch.Tensor:
    """[T, 3, H, W] float32 in [-1, 1]; see iter_video_frames (prefer it for long videos: 832x480 float
    frames take 4.8 MB each).

    indices: instead of a range, these frames (after resampling), in this order, repeats allowed; an index
    past the end gives the last frame. Two passes: video_frame_count, then ffmpeg's select filter picks the
    frames, so only they cross the pipe.
    """
    if indices is not None:
        if start or count is not None:
            raise ValueError("give either indices or start/count, not both")
        return _frames_at(_require_file(path), fps, size, list(indices))
    chunks = list(iter_video_frames(path, fps=fps, size=size, start=start, count=count))
    if not chunks:
        raise MediaError(path, f"no video frames from frame {start} on (at {fps or 'the stored'} fps)")
    return torch.cat(chunks)


def _frames_at(path: Path, fps: float | None, size: tuple[int, int] | None, indices: list[int]) -> torch.Tensor:
    if not indices or min(indices) < 0:
        raise ValueError(f"indices must be a non-empty list of frame numbers >= 0, got {indices}")
    total = video_frame_count(path, fps)
    if total == 0:
        raise MediaError(path, "the video has no frames")
    clamped = [min(i, total - 1) for i in indices]
    wanted = sorted(set(clamped))
    stream = _input(path)["V:0"]
    if fps is not None:
        stream = stream.filter("fps", fps=fps)
    stream = stream.trim(end_frame=wanted[-1] + 1).filter("select", "+".join(f"eq(n,{i})" for i in wanted))
    stream = stream.filter("scale", w="round(iw*sar)", h="ih").filter("setsar", 1)
    spec = ffmpeg.output(stream, "pipe:", format="image2pipe", vcodec="ppm", pix_fmt="rgb24",
                         **_passthrough(ffmpeg_binary()))
    frames = torch.cat(list(_decode_frames(path, _command(spec), size, chunk=16)))
    if len(frames) != len(wanted):
        raise MediaError(path, f"expected {len(wanted)} selected frames, ffmpeg gave {len(frames)}")
    row = {index: k for k, index in enumerate(wanted)}
    return frames[[row[i] for i in clamped]]


def _read_ppm(pipe, path: Path) -> np.ndarray | None:
    """One binary PPM ("P6\\n<w> <h>\\n255\\n" + rgb24) from the pipe as [H, W, 3] uint8; None at the end."""
    magic = pipe.read(2)
    if not magic:
        return None
    fields: list[int] = []  # width, height, maximum value; each ends with one whitespace byte
    token = b""
    while magic == b"P6" and len(fields) < 3 and (byte := pipe.read(1)):
        if not byte.isspace():
            token += byte
        elif token:
            fields.append(int(token))
            token = b""
    if magic != b"P6" or len(fields) < 3 or fields[2] != 255:
        raise MediaError(path, "unexpected data in ffmpeg's PPM output")
    width, height = fields[0], fields[1]
    data = pipe.read(width * height * 3)
    if len(data) < width * height * 3:
        raise MediaError(path, "ffmpeg's output ended inside a frame")
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


def _frames_to_tensor(frames: list[np.ndarray], size: tuple[int, int] | None) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return fit_to(batch, *size) if size is not None else batch.contiguous()


# --------------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------------


def read_audio(path: PathLike, sample_rate: int | None = SAMPLE_RATE, mono: bool = True) -> np.ndarray:
    """The first audio stream of any file ffmpeg reads (wav, mp3, m4a, flac, ogg, the track of a video) as
    float32 in [-1, 1]: [S] when mono (the mean of the channels, as librosa's mono=True), else [C, S].

    sample_rate: resampled by ffmpeg (swresample); None keeps the file's rate.
    """
    path = _require_file(path)
    if _dump(path).audio is None:
        raise MediaError(path, "no audio stream")
    with _WavDecoder(path, sample_rate=sample_rate, sample_format="flt") as wav:
        data = bytearray()
        for block in wav.blocks():
            data += block
    samples = np.frombuffer(data, np.float32).reshape(-1, wav.channels)
    if samples.shape[0] == 0:
        raise MediaError(path, "the audio stream decodes to no samples")
    return samples.mean(axis=1, dtype=np.float32) if mono else np.ascontiguousarray(samples.T)
