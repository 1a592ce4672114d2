"""Fixtures shared by several test files."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.checkpoints import CheckpointPaths
from pipeline.models.tiny import write_tiny_checkpoints


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
