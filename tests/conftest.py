"""Fixtures shared by several test files; and Triton's interpreter on machines without CUDA."""

import os

import torch

# Without a GPU, Triton kernels (pipeline/kernels/attention_int8fp8.py) run in Triton's interpreter.
# Triton reads this when it is first imported (its own library is decorated then), so it is set here,
# before any test or pipeline module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline.models.checkpoints import CheckpointPaths  # noqa: E402
from pipeline.models.tiny import write_tiny_checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> CheckpointPaths:
    """The tiny model in the official layout, written once per test session."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_dit_state(tiny) -> dict[str, torch.Tensor]:
    """Every DiT tensor of the tiny set as its files hold it: the shards and the InfiniteTalk file."""
    state = {}
    for shard in sorted(tiny.wan_dir.glob("diffusion_pytorch_model-*.safetensors")):
        state |= load_file(shard)
    return state | load_file(tiny.infinitetalk)
