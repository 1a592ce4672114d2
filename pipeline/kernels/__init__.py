"""Hardware-specific code: attention backends (attention.py) and fp8 linear layers (fp8.py).

A backend or quantisation mode that this machine or installation cannot run is refused at start-up
with `KernelUnavailable`, naming what was asked and what is available; nothing falls back silently.
"""


class KernelUnavailable(ValueError):
    """A requested attention backend or quantisation mode cannot run here."""
