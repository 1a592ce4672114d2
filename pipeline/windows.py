"""The long-video window loop's arithmetic: which frames each window renders, and its audio slice.

A job's video is rendered as a chain of windows of at most `window` frames (4n+1, the Wan VAE's frame rule).
Every window after the first starts `motion` frames before the previous one ends: those leading frames are
the previous window's last `motion` frames, given to the model as clean context, and are dropped when the
windows are stitched (no blending). Timeline of a 500-frame job with window 117, motion 25:

    window 0: frames [  0, 117)  keeps all 117
    window 1: frames [ 92, 209)  keeps [117, 209)   (its first 25 frames are window 0's last 25)
    window 2: frames [184, 301)  keeps [209, 301)
    window 3: frames [276, 393)  keeps [301, 393)
    window 4: frames [368, 485)  keeps [393, 485)
    window 5: frames [460, 501)  keeps [485, 501)   (shortened to 41 = 25 + 16; frame 500 is trimmed)

Differences from the official loop (wan/multitalk.py, generate_infinitetalk), which renders every window at
full length and trims the stitched video afterwards:
- the last window is shortened to the frames that are still missing (rounded up to 4n+1), so at most 3
  frames past the end of the audio are rendered and then trimmed;
- audio shorter than one window gives one shorter window (the official code rejects it).

Audio features per window follow the official code exactly: the feature track is extended past its end with
a time-reversed copy of its tail (pad_features), then each frame takes the features of frames -2..+2 around
it, clamped into the track (window_audio).
"""

import math
from dataclasses import dataclass

import torch

from pipeline.job import FPS

# Each frame is conditioned on the audio features of its neighbours at offsets -2..+2 (official `indices`).
NEIGHBOURS = 2


def frames_for_duration(duration_s: float, fps: float = FPS) -> int:
    """Video frames that cover `duration_s` of audio: ceil(duration * fps), so no speech is lost.

    The official code uses int(duration * 25), i.e. floor: up to one frame (40 ms) of speech at the end has
    no frame. The product is rounded to 1e-6 frame first because a duration derived from a sample count is
    inexact in binary (4480 / 16000 * 25 = 7.000000000000001), and a plain ceil would add a spurious frame.
    """
    return math.ceil(round(duration_s * fps, 6))


@dataclass(frozen=True)
class Window:
    """One window of the loop; frame numbers are on the job's timeline (frame 0 = first video frame).

    index:  position in the plan, 0 for the first window.
    start:  first frame the window renders.
    length: frames it renders, always 4n+1.
    motion: the plan's motion-frame count M; for index > 0 the first M frames rendered repeat the previous
            window's last M frames (they are the context the model continues from).
    """

    index: int
    start: int
    length: int
    motion: int

    @property
    def new_from(self) -> int:
        """Offset, within the window, of its first frame that is new: the frames before are dropped."""
        return 0 if self.index == 0 else self.motion

    @property
    def end(self) -> int:
        """One past the last frame the window renders."""
        return self.start + self.length

    @property
    def new_frames(self) -> int:
        """Frames the window adds to the video: [start + new_from, end)."""
        return self.length - self.new_from


def _is_4n_plus_1(value: int) -> bool:
    return value >= 1 and value % 4 == 1


def _round_up_4n_plus_1(frames: int) -> int:
    """Smallest 4n+1 that is >= frames (frames >= 1)."""
    return 4 * ((frames - 1 + 3) // 4) + 1


def plan_windows(num_frames: int, window: int = 117, motion: int = 25) -> list[Window]:
    """Windows covering frames [0, num_frames), each later one overlapping the previous by `motion` frames.

    Every window renders `window` frames except the last (or only) one, which renders the smallest 4n+1
    count whose new frames reach num_frames; the video is therefore 0..3 frames longer than num_frames.
    """
    if not (_is_4n_plus_1(window) and window >= 5):
        raise ValueError(f"window must be 4n+1 and >= 5, got window={window}")
    if not _is_4n_plus_1(motion):
        raise ValueError(f"motion must be 4k+1 and >= 1, got motion={motion}")
    if motion >= window:
        raise ValueError(f"motion must be smaller than window={window}, got motion={motion}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got num_frames={num_frames}")

    plan = [Window(index=0, start=0, length=min(window, _round_up_4n_plus_1(num_frames)), motion=motion)]
    while plan[-1].end < num_frames:
        previous = plan[-1]
        missing = num_frames - previous.end
        # motion is 4k+1, so motion + (a multiple of 4) is 4n+1: round the new frames up to a multiple of 4.
        length = min(window, motion + 4 * -(-missing // 4))
        start = previous.end - motion
        plan.append(Window(index=previous.index + 1, start=start, length=length, motion=motion))
    return plan


def total_frames(plan: list[Window]) -> int:
    """Frames the stitched video has before trimming to the audio: the last window's end."""
    return plan[-1].end


def pad_features(features: torch.Tensor, frames_needed: int) -> torch.Tensor:
    """Extend audio features [N, ...] past their end: frames [0, frames_needed) and their +-2 get features.

    Official rule (wan/multitalk.py, generate_infinitetalk, before the last window):
        if audio_end_idx >= len(full_audio_embs):
            miss_length = audio_end_idx - len(full_audio_embs) + 3
            add_audio_emb = torch.flip(full_audio_embs[-1*miss_length:], dims=[0])
            full_audio_embs = torch.cat([full_audio_embs, add_audio_emb], dim=0)
    with audio_end_idx = the last window's end = frames_needed. So when frames_needed >= N the track gets
    frames_needed - N + 3 more frames, the track's tail read backwards: padded[N + j] = features[N - 1 - j]
    (the last frame repeated once, then stepping back in time); the +3 covers the +2 neighbours of the last
    frame. When frames_needed < N nothing is added; window_audio's clamp serves the neighbours.

    Padding once up front instead of before the last window changes nothing for earlier windows: their
    neighbours reach at most index N, where clamping the unpadded track and the padded track both give
    features[N - 1].

    When the tail to add is longer than the track itself (audio under 6 frames, which the official code
    rejects), the official slice would come up short; the reflection is continued instead (forwards again,
    then backwards...), so the result always has max(N, frames_needed + 3) frames.
    """
    n = features.shape[0]
    if frames_needed < n:
        return features
    length = frames_needed + 3
    mirrored = torch.cat([features, features.flip(0)])
    repeats = -(-length // mirrored.shape[0])
    return mirrored.repeat(repeats, *[1] * (features.dim() - 1))[:length]


def window_audio(features: torch.Tensor, window: Window) -> torch.Tensor:
    """Audio features for each frame of `window`: [length, 5, layers, C] from a padded track [N, layers, C].

    Frame t takes features[t - 2 .. t + 2], each index clamped into [0, N - 1] as the official code does
    (at the start of the video this repeats frame 0). `features` must come from pad_features with the plan's
    total_frames, so that the window's own frames have features and only the first window's left neighbours
    are clamped.
    """
    if window.end > features.shape[0]:
        raise ValueError(
            f"audio features cover {features.shape[0]} frames but window {window.index} ends at frame "
            f"{window.end}; pad them with pad_features(features, total_frames(plan)) first"
        )
    offsets = torch.arange(-NEIGHBOURS, NEIGHBOURS + 1)
    centres = torch.arange(window.start, window.end)
    indices = (centres[:, None] + offsets[None, :]).clamp(0, features.shape[0] - 1)
    return features[indices]
