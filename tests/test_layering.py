"""The layering of DESIGN.md, checked in fresh processes: pipeline/ imports no Ray, Hydra or farm/, and
pipeline/kernels/ is a leaf (nothing from pipeline/models/, no diffusers)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
import pipeline.kernels

REPO = Path(__file__).parents[1]


def imported_by(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of `prefixes` that importing `module` brings in."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith({prefixes!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.split()


def modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]


@pytest.mark.parametrize("module", modules(pipeline.kernels))
def test_kernels_are_leaves(module):
    assert imported_by(module, ("pipeline.models", "diffusers", "transformers")) == []


def test_the_pipeline_imports_no_ray_hydra_or_farm():
    everything = " ".join(sorted(m for m in modules(pipeline)))
    code = f"import sys, importlib; [importlib.import_module(m) for m in {everything.split()!r}]; " \
           "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('ray', 'hydra', 'omegaconf', 'farm')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
