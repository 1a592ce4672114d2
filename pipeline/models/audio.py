"""Speech features for InfiniteTalk: loudness normalisation and wav2vec2 features at the video frame rate.

The audio arrives here already decoded: mono float samples at 16 kHz (decoding lives in pipeline/media/read.py).

    samples -> loudness_normalize (-23 LUFS) -> AudioEncoder.features -> [feature_frames(S), layers, hidden]

wav2vec2 is chinese-wav2vec2-base in Hugging Face format (12 layers, 768 wide, group-norm CNN feature
extractor, no stable layer norm). InfiniteTalk does not use it as is: the 50 Hz output of the CNN feature
extractor is resampled to the 25 fps video rate *before* the feature projection and the transformer, so the
transformer runs directly on video frames, and the outputs of all its layers are kept.
"""

from pathlib import Path

import numpy as np
import pyloudnorm
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from pipeline.job import FPS, MIN_AUDIO_SAMPLES, SAMPLE_RATE



def feature_frames(num_samples: int) -> int:
    """The video frames the official code computes features for: get_embedding's
    int(len(samples) / 16000 * 25), float expression and floor included, at least 1. Because the
    interpolation aligns both ends, this count fixes every frame's position on the 50 Hz grid, so a video
    of ceil(duration x 25) frames takes the features at this count and pads the frame past its end."""
    return max(1, int(num_samples / SAMPLE_RATE * FPS))

# ITU-R BS.1770 measures loudness over 400 ms gating blocks; pyloudnorm refuses shorter input.
_BS1770_BLOCK_S = 0.4


def loudness_normalize(samples: np.ndarray, sample_rate: int, target_lufs: float = -23.0) -> np.ndarray:
    """Scale mono `samples` so that their integrated loudness (ITU-R BS.1770, pyloudnorm) is `target_lufs`.

    As in the official code, a signal whose measured loudness is beyond +-100 LUFS is returned unchanged:
    that is digital silence or a signal entirely under BS.1770's -70 LUFS absolute gate (both measure -inf),
    where a gain would only amplify noise. A signal hovering around that gate is measured on its louder
    blocks only, so it can land ~1 LU off target (the official code behaves the same). The result is not
    clipped (neither is the official one) and keeps the input's dtype.

    A clip shorter than one 400 ms block cannot be measured by the standard meter; we measure it as a single
    block spanning the whole clip (same K-weighting, no gating between blocks), so short clips are normalised
    too instead of failing or being left at their original level.
    """
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples of shape [S], got shape {samples.shape}")
    if samples.size == 0:
        raise ValueError("cannot normalise the loudness of an empty signal")
    block_s = min(_BS1770_BLOCK_S, samples.size / sample_rate)
    loudness = pyloudnorm.Meter(sample_rate, block_size=block_s).integrated_loudness(samples)
    if abs(loudness) > 100:
        return samples
    return pyloudnorm.normalize.loudness(samples, loudness, target_lufs).astype(samples.dtype, copy=False)


class AudioEncoder:
    """wav2vec2 loaded from a Hugging Face directory, run the InfiniteTalk way (see `features`)."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu"):
        # float32 as in the official code (it runs wav2vec2 in float32 on the CPU).
        self.model = Wav2Vec2Model.from_pretrained(directory, dtype=torch.float32).to(device).eval()
        # The official code passes the samples through the directory's Wav2Vec2FeatureExtractor, which only
        # standardises them (zero mean, unit variance) when preprocessor_config.json says do_normalize.
        # chinese-wav2vec2-base says false, so there the samples go in as they are.
        self.normalize_input = Wav2Vec2FeatureExtractor.from_pretrained(directory).do_normalize

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def features(self, samples_16k: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Per-video-frame speech features [num_frames, num_layers, hidden], in the model's dtype and device.

        samples_16k: mono samples [S] at 16 kHz, loudness-normalised. num_frames: video frames at 25 fps,
        normally feature_frames(S), the official grid. The whole clip is encoded in one pass, as in the official
        code: the transformer's attention spans the whole clip, so encoding in pieces would change the result.
        """
        if samples_16k.ndim != 1:
            raise ValueError(f"expected mono samples of shape [S], got shape {tuple(samples_16k.shape)}")
        num_samples = samples_16k.shape[0]
        if self.model._get_feat_extract_output_lengths(num_samples) < 1:
            raise ValueError(f"{num_samples} samples is shorter than wav2vec2's {MIN_AUDIO_SAMPLES}-sample "
                             f"({MIN_AUDIO_SAMPLES / SAMPLE_RATE * 1000:g} ms) receptive field")

        x = samples_16k.to(self.model.device, self.model.dtype)[None]  # [1, S]
        if self.normalize_input:
            # Wav2Vec2FeatureExtractor's formula: population variance, epsilon 1e-7.
            x = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)

        cnn = self.model.feature_extractor(x)  # [1, C, T_50Hz]
        cnn = F.interpolate(cnn, size=num_frames, mode="linear", align_corners=True)  # [1, C, num_frames]
        hidden = self.model.feature_projection(cnn.transpose(1, 2))[0]  # [1, num_frames, hidden]
        # The model's SpecAugment masking (_mask_hidden_states) is a no-op in eval mode, so it is skipped.

        # On transformers 5 the encoder called on its own returns only the last hidden state (the per-layer
        # states are recorded by the top-level model's forward, which we cannot use because of the
        # interpolation above), so the output of each encoder layer is taken with a forward hook. These are
        # the official hidden_states[1:]; hidden_states[0] is the encoder's input embedding, not kept.
        layer_outputs = []
        hooks = [
            layer.register_forward_hook(lambda _module, _inputs, output: layer_outputs.append(output))
            for layer in self.model.encoder.layers
        ]
        try:
            self.model.encoder(hidden)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(layer_outputs, dim=2)[0]  # [num_frames, num_layers, hidden]


def write_tiny_wav2vec2(directory: str | Path, seed: int) -> Path:
    """Write a tiny random wav2vec2 in the layout of chinese-wav2vec2-base's Hugging Face directory.

    config.json, model.safetensors and preprocessor_config.json, loadable with
    Wav2Vec2Model.from_pretrained(directory). Same architecture as the real model at toy width: group-norm
    CNN feature extractor with the real kernels and strides (total stride 320, receptive field 400 samples,
    so 16 kHz still gives 50 Hz with the same frame count), post-norm transformer (no stable layer norm),
    hidden 32, 3 layers, 2 heads. The same seed writes the same bytes.
    """
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    return write_wav2vec2(directory, config, seed)


def write_wav2vec2(directory: str | Path, config: Wav2Vec2Config, seed: int) -> Path:
    """A random wav2vec2 of `config` in the Hugging Face directory layout (seeded: same seed, same bytes)."""
    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Wav2Vec2Model(config)
    model.save_pretrained(directory)
    # Like the real repository's preprocessor_config.json: raw samples in, no standardisation.
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=False, return_attention_mask=False
    ).save_pretrained(directory)
    return directory
