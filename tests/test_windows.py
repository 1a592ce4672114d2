"""pipeline.windows: the window plan's invariants, and audio padding/slicing against the official rule.

The references for the audio are written here from wan/multitalk.py (generate_infinitetalk) line by line:
the tail flip `torch.flip(full_audio_embs[-miss_length:], dims=[0])` with miss_length = end - N + 3, and
per-frame neighbour indices clamped into the track, as plain loops.
"""

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.windows import Window, pad_features, plan_windows, total_frames, window_audio

WINDOWS = [5, 9, 21, 33, 81, 117, 121]


@st.composite
def settings_and_length(draw, max_frames=3000):
    window = draw(st.sampled_from(WINDOWS))
    motion = 4 * draw(st.integers(0, (window - 5) // 4)) + 1
    num_frames = draw(st.integers(1, max_frames))
    return num_frames, window, motion


def kept_frames(w: Window) -> range:
    return range(w.start + w.new_from, w.end)


# --- plan -------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(settings_and_length())
def test_plan_invariants(case):
    num_frames, window, motion = case
    plan = plan_windows(num_frames, window, motion)
    total = total_frames(plan)

    assert [w.index for w in plan] == list(range(len(plan)))
    assert plan[0].start == 0 and plan[0].new_from == 0
    for w in plan:
        assert w.length % 4 == 1 and w.length <= window
        assert w.new_frames == w.length - w.new_from
    for previous, w in zip(plan, plan[1:]):
        assert w.start == previous.end - motion  # overlaps the previous by exactly M
        assert w.new_from == motion
        assert w.start > previous.start
        assert previous.length == window  # only the last window may be short

    counts = Counter(f for w in plan for f in kept_frames(w))
    assert sorted(counts) == list(range(total)) and set(counts.values()) == {1}
    assert 0 <= total - num_frames <= 3
    # The last window adds frames that are still needed: without it the video would be too short.
    assert len(plan) == 1 or plan[-2].end < num_frames


def test_half_second_is_one_short_window():
    # 0.5 s at 25 fps = 13 frames (ceil), itself 4n+1.
    assert plan_windows(13, 117, 25) == [Window(index=0, start=0, length=13, motion=25)]


def test_exactly_one_window():
    # 4.68 s = 117 frames.
    assert plan_windows(117, 117, 25) == [Window(index=0, start=0, length=117, motion=25)]


def test_one_frame_past_one_window():
    # 4.7 s = 118 frames: one more frame needs a second window of 25 context + 4 new frames.
    plan = plan_windows(118, 117, 25)
    assert plan == [Window(0, 0, 117, 25), Window(1, 92, 29, 25)]
    assert plan[1].new_frames == 4 and total_frames(plan) == 121


def test_twenty_seconds():
    plan = plan_windows(500, 117, 25)
    assert [(w.start, w.length) for w in plan] == [
        (0, 117), (92, 117), (184, 117), (276, 117), (368, 117), (460, 41)
    ]
    assert [w.new_frames for w in plan] == [117, 92, 92, 92, 92, 16]
    assert total_frames(plan) == 501


def test_tiny_audio():
    assert plan_windows(1, 81, 9) == [Window(0, 0, 1, 9)]
    assert plan_windows(2, 81, 9) == [Window(0, 0, 5, 9)]


@pytest.mark.parametrize(
    "num_frames, window, motion, name",
    [
        (100, 116, 25, "window=116"),
        (100, 1, 1, "window=1"),
        (100, 4, 1, "window=4"),
        (100, 117, 24, "motion=24"),
        (100, 117, 0, "motion=0"),
        (100, 117, 117, "motion=117"),
        (100, 81, 121, "motion=121"),
        (0, 117, 25, "num_frames=0"),
        (-5, 117, 25, "num_frames=-5"),
    ],
)
def test_invalid_settings(num_frames, window, motion, name):
    with pytest.raises(ValueError, match=name):
        plan_windows(num_frames, window, motion)


# --- audio ------------------------------------------------------------------------------------------------


def official_pad(features: torch.Tensor, end: int) -> torch.Tensor:
    """wan/multitalk.py: append the tail, time-reversed, when the last window's end reaches the audio end."""
    n = features.shape[0]
    if end < n:
        return features
    miss = end - n + 3
    assert miss <= n, "the official slice is only complete for audio at least this long"
    rows = [features[i] for i in range(n)] + [features[n - 1 - j] for j in range(miss)]
    return torch.stack(rows)


def official_window_audio(track: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """wan/multitalk.py: frame t takes track[t-2 .. t+2], each index clamped into the track."""
    last = track.shape[0] - 1
    return torch.stack(
        [torch.stack([track[min(max(t + o, 0), last)] for o in range(-2, 3)]) for t in range(start, end)]
    )


@settings(max_examples=200, deadline=None)
@given(settings_and_length(max_frames=60), st.integers(0, 2**31 - 1))
def test_pad_and_window_audio_match_official(case, seed):
    num_frames, window, motion = case
    features = torch.randn(num_frames, 3, 4, generator=torch.Generator().manual_seed(seed))
    plan = plan_windows(num_frames, window, motion)
    padded = pad_features(features, total_frames(plan))
    assert padded.shape[0] == total_frames(plan) + 3
    if num_frames >= 6:  # the official tail is complete (miss_length <= N)
        assert torch.equal(padded, official_pad(features, total_frames(plan)))
    for w in plan:
        got = window_audio(padded, w)
        assert got.shape == (w.length, 5, 3, 4)
        assert torch.equal(got, official_window_audio(padded, w.start, w.end))


@pytest.mark.parametrize("n", [296, 297, 298, 299, 300, 301])
def test_padding_once_matches_official_loop(n):
    # The official loop clamps earlier windows against the unpadded track and pads just before its last
    # window (each window full length); padding up front must give every frame the same features.
    # Windows 81/9 end at 81, 153, 225, 297: n = 298 puts a non-last window's +2 neighbour on index N.
    window, motion = 81, 9
    features = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(0))
    track, start, official = features, 0, {}
    while True:
        end = start + window
        for t, row in zip(range(start, end), official_window_audio(track, start, end)):
            official[t] = row
        if end >= n:
            break
        start += window - motion
        if start + window >= n:
            track = official_pad(track, start + window)

    plan = plan_windows(n, window, motion)
    padded = pad_features(features, total_frames(plan))
    for w in plan:
        for t, row in zip(range(w.start, w.end), window_audio(padded, w)):
            assert torch.equal(row, official[t]), t


def test_pad_reads_the_tail_backwards():
    features = torch.arange(10.0)[:, None]
    padded = pad_features(features, 12)  # miss = 12 - 10 + 3 = 5
    assert padded[:, 0].tolist() == list(range(10)) + [9, 8, 7, 6, 5]
    assert torch.equal(pad_features(features, 9), features)  # end before the audio end: nothing added


def test_pad_keeps_reflecting_short_audio():
    features = torch.arange(2.0)[:, None]
    padded = pad_features(features, 5)  # needs 8 frames from 2
    assert padded[:, 0].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]


def test_window_audio_needs_padded_track():
    plan = plan_windows(118, 117, 25)
    with pytest.raises(ValueError, match="pad_features"):
        window_audio(torch.zeros(118, 2, 3), plan[1])


def test_window_audio_first_frames_repeat_frame_zero():
    features = torch.arange(20.0)[:, None, None]
    w = plan_windows(20, 9, 5)[0]
    got = window_audio(pad_features(features, 20), w)[:, :, 0, 0]
    assert got[0].tolist() == [0, 0, 0, 1, 2]
    assert got[1].tolist() == [0, 0, 1, 2, 3]
    assert got[8].tolist() == [6, 7, 8, 9, 10]
