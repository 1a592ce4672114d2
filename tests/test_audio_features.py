"""pipeline.models.audio on a tiny random wav2vec2 (CPU).

The reference for the features is computed independently of AudioEncoder: a float64 copy of the model, a
naive float64 linear interpolation written here, and the top-level Wav2Vec2Model forward (which records the
per-layer hidden states itself) instead of AudioEncoder's forward hooks.
"""

import json
import math
import shutil

import numpy as np
import pyloudnorm
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from pipeline.models.audio import (
    SAMPLE_RATE,
    AudioEncoder,
    feature_frames,
    loudness_normalize,
    write_tiny_wav2vec2,
)
from pipeline.render import speech_features
from pipeline.speakers import arrange_speakers
from pipeline.windows import frames_for_duration, plan_windows, total_frames

NUM_LAYERS, HIDDEN = 3, 32


def speech_like(duration_s: float, seed: int = 0) -> np.ndarray:
    """Voiced-speech stand-in: 10 harmonics of a gliding ~140 Hz pitch, 4 syllables a second, light noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 11))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    signal = voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"), seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return AudioEncoder(tiny_dir)


@pytest.fixture(scope="module")
def encoder64(tiny_dir):
    encoder = AudioEncoder(tiny_dir)
    encoder.model.double()
    return encoder


# ---------------------------------------------------------------------------------------------- frame count


@pytest.mark.parametrize(
    "duration_s, frames", [(0.5, 13), (1.0, 25), (4.68, 117), (4.7, 118), (2.345, 59), (0.04, 1), (0.041, 2)]
)
def test_video_frame_count(duration_s, frames):
    assert frames_for_duration(duration_s) == frames


def test_video_frame_count_is_exact_for_sample_counts():
    # Every sample count up to 20 s: the float path agrees with integer ceil(n * 25 / 16000).
    for n in range(1, 20 * SAMPLE_RATE):
        assert frames_for_duration(n / SAMPLE_RATE) == -(-n * 25 // SAMPLE_RATE), n


# ------------------------------------------------------------------------------------------------ features


@pytest.mark.parametrize("duration_s", [0.5, 1.0, 4.68, 4.7, 2.345])
def test_features_shape(encoder, duration_s):
    samples = torch.from_numpy(speech_like(duration_s))
    frames = frames_for_duration(samples.shape[0] / SAMPLE_RATE)
    out = encoder.features(samples, frames)
    assert out.shape == (frames, NUM_LAYERS, HIDDEN)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (encoder.num_layers, encoder.hidden_size) == (NUM_LAYERS, HIDDEN)


def naive_interpolate(features: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation along time [T, C] -> [size, C], end points aligned (align_corners=True)."""
    length = features.shape[0]
    out = np.empty((size, features.shape[1]), dtype=np.float64)
    for i in range(size):
        position = i * (length - 1) / (size - 1) if size > 1 else 0.0
        left = min(int(math.floor(position)), length - 1)
        right = min(left + 1, length - 1)
        weight = position - left
        out[i] = (1 - weight) * features[left] + weight * features[right]
    return out


@pytest.fixture(scope="module")
def reference_model(tiny_dir):
    return Wav2Vec2Model.from_pretrained(tiny_dir, dtype=torch.float64).eval()


def reference_features(model: Wav2Vec2Model, samples: torch.Tensor, num_frames: int) -> torch.Tensor:
    with torch.no_grad():
        cnn = model.feature_extractor(samples.double()[None])[0].T.numpy()  # [T_50Hz, C]
        resampled = torch.from_numpy(naive_interpolate(cnn, num_frames)).T[None]  # [1, C, num_frames]
        # Feed the resampled features through the top-level forward (feature projection, encoder, and the
        # model's own recording of hidden states) by standing them in for the CNN's output.
        model.feature_extractor.forward = lambda _input_values: resampled
        try:
            hidden_states = model(torch.zeros(1, 1, dtype=torch.float64), output_hidden_states=True).hidden_states
        finally:
            del model.feature_extractor.forward
    assert len(hidden_states) == NUM_LAYERS + 1
    return torch.stack(hidden_states[1:], dim=2)[0]  # [num_frames, layers, hidden]


@pytest.mark.parametrize(
    "duration_s, num_frames",
    [(1.0, 25), (2.345, 59), (4.7, 118), (0.5, 1), (1.0, 7), (1.0, 80)],
)
def test_features_match_independent_computation(reference_model, encoder, encoder64, duration_s, num_frames):
    samples = torch.from_numpy(speech_like(duration_s, seed=1))
    reference = reference_features(reference_model, samples, num_frames)
    # Same computation: in float64 both paths agree to round-off.
    torch.testing.assert_close(encoder64.features(samples, num_frames), reference, rtol=1e-10, atol=1e-10)
    # The float32 model (what runs in production) against it. The outputs are O(1) (layer-normed), but the
    # feature projection's LayerNorm divides by the per-frame spread of the CNN features, which is ~1e-3 in
    # the near-silent frames between syllables, so float32 round-off is amplified there (seen: 3e-4).
    torch.testing.assert_close(encoder.features(samples, num_frames).double(), reference, rtol=0, atol=2e-3)


# ------------------------------------------------------------------------------------- the official grid


@pytest.mark.parametrize("samples, frames", [(36_800, 57), (14_880, 23), (4_480, 7), (640, 1), (400, 1), (639, 1)])
def test_feature_frames_is_the_official_count(samples, frames):
    assert feature_frames(samples) == frames == max(1, int(samples / 16000 * 25))  # get_embedding's expression


def official_speech_features(model: Wav2Vec2Model, track: np.ndarray, frames_needed: int) -> torch.Tensor:
    """The official features of one track, computed here: int(S / 16000 * 25) frames at CNN positions
    i * (T50 - 1) / (n - 1), and past the end the track's tail read backwards (generate_infinitetalk's
    flip of the last frames_needed - n + 3 features)."""
    n = int(len(track) / 16000 * 25)
    features = reference_features(model, torch.from_numpy(track), n)
    tail = [features[n - 1 - j] for j in range(frames_needed - n + 3)]
    return torch.cat([features, torch.stack(tail)])


@pytest.mark.parametrize("speakers", [(0.93,), (2.3,), (1.37,), (0.93, 1.37, "para"), (1.37, 0.93, "add")])
def test_speech_features_are_on_the_official_grid(reference_model, encoder, speakers):
    *durations, audio_type = speakers if len(speakers) == 3 else (*speakers, "para")
    tracks = arrange_speakers([speech_like(d, seed=i) for i, d in enumerate(durations)], audio_type)
    video_frames = frames_for_duration(len(tracks[0]) / SAMPLE_RATE)  # ceil: one more than the official count
    assert video_frames == feature_frames(len(tracks[0])) + 1
    needed = total_frames(plan_windows(video_frames, 33, 9))
    for track in tracks:
        ours = speech_features(encoder, track, needed)
        torch.testing.assert_close(ours.double(), official_speech_features(reference_model, track, needed),
                                   rtol=0, atol=2e-3)  # float32 against float64, as above


def test_input_standardisation_follows_preprocessor_config(tiny_dir, encoder, encoder64, tmp_path):
    samples = speech_like(1.0, seed=2)
    # The tiny directory, like chinese-wav2vec2-base, says do_normalize false: the official processor hands
    # the samples through unchanged, and so do we.
    processor = Wav2Vec2FeatureExtractor.from_pretrained(tiny_dir)
    assert np.array_equal(processor(samples, sampling_rate=SAMPLE_RATE).input_values[0], samples)
    assert encoder.normalize_input is False

    # With do_normalize true, our standardisation equals the processor's.
    normalizing_dir = shutil.copytree(tiny_dir, tmp_path / "normalizing")
    config_path = normalizing_dir / "preprocessor_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "do_normalize": True}))
    standardised = Wav2Vec2FeatureExtractor.from_pretrained(normalizing_dir)(samples, sampling_rate=SAMPLE_RATE)
    frames = frames_for_duration(1.0)
    expected = encoder64.features(torch.from_numpy(standardised.input_values[0]), frames)
    normalizing = AudioEncoder(normalizing_dir)
    normalizing.model.double()
    ours = normalizing.features(torch.from_numpy(samples), frames)
    # The processor standardises in float32, we in float64: they differ by float32 round-off of O(1) inputs.
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_too_short_for_the_receptive_field(encoder):
    with pytest.raises(ValueError, match="receptive field"):
        encoder.features(torch.zeros(399), 1)
    assert encoder.features(torch.zeros(400), 1).shape == (1, NUM_LAYERS, HIDDEN)


# ------------------------------------------------------------------------------------------- tiny checkpoint


def test_tiny_checkpoint_is_deterministic_and_shaped_like_the_real_one(tiny_dir, tmp_path):
    again = write_tiny_wav2vec2(tmp_path / "again", seed=0)
    other = write_tiny_wav2vec2(tmp_path / "other", seed=1)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json"]
    for name in names:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()

    config = Wav2Vec2Model.from_pretrained(tiny_dir).config
    assert config.feat_extract_norm == "group" and not config.do_stable_layer_norm
    assert math.prod(config.conv_stride) == 320  # 16 kHz -> 50 Hz
    # Same CNN geometry as chinese-wav2vec2-base: 1 s of audio gives 49 frames.
    model = Wav2Vec2Model.from_pretrained(tiny_dir)
    assert int(model._get_feat_extract_output_lengths(SAMPLE_RATE)) == 49


# -------------------------------------------------------------------------------------------------- loudness


def measure(samples: np.ndarray, block_s: float = 0.4) -> float:
    return pyloudnorm.Meter(SAMPLE_RATE, block_size=block_s).integrated_loudness(samples)


@pytest.mark.parametrize("gain", [0.01, 0.03, 0.3, 1.9])  # about -60, -51, -31, -15 LUFS
def test_loudness_lands_on_target(gain):
    samples = speech_like(3.0) * np.float32(gain)
    out = loudness_normalize(samples, SAMPLE_RATE)
    assert out.dtype == np.float32 and out.shape == samples.shape
    assert abs(measure(out) - (-23.0)) < 0.5


def test_loudness_other_target():
    out = loudness_normalize(speech_like(3.0), SAMPLE_RATE, target_lufs=-16.0)
    assert abs(measure(out) - (-16.0)) < 0.5


def test_silence_is_left_alone():
    silence = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    assert loudness_normalize(silence, SAMPLE_RATE) is silence
    # Entirely under BS.1770's -70 LUFS absolute gate measures -inf as well: also left alone.
    whisper = speech_like(3.0) * np.float32(1e-5)
    assert measure(whisper) == -np.inf
    assert loudness_normalize(whisper, SAMPLE_RATE) is whisper


def test_clip_shorter_than_one_block_is_measured_as_one_block():
    clip = speech_like(0.25)
    with pytest.raises(ValueError):
        measure(clip)  # the standard 400 ms meter refuses it
    quiet, loud = (loudness_normalize(clip * np.float32(g), SAMPLE_RATE) for g in (0.05, 1.5))
    np.testing.assert_allclose(quiet, loud, rtol=1e-5, atol=1e-7)  # the level no longer depends on the gain
    assert abs(measure(quiet, block_s=0.25) - (-23.0)) < 0.5
    with pytest.raises(ValueError, match="empty"):
        loudness_normalize(np.zeros(0, dtype=np.float32), SAMPLE_RATE)
