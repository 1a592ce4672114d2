"""Hardware-specific code: attention backends (attention.py, with our Triton 8-bit kernel in
attention_int8fp8.py), fp8 linear layers (fp8.py), block offload (offload.py), compiled blocks (compile.py).

A backend or quantisation mode that this machine or installation cannot run is refused at start-up
with `KernelUnavailable`, naming what was asked and what is available; nothing falls back silently.
"""


class KernelUnavailable(ValueError):
    """A requested attention backend or quantisation mode cannot run here."""
