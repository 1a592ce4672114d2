"""DiT blocks kept in page-locked host memory and streamed to the GPU just ahead of their use.

    offload_blocks(model, device, ahead=2) -> BlockOffload

Where the weights live: every parameter and buffer of `model.blocks` (the 14B's blocks are 34.6 of its
35.5 GiB in bf16; fp8 layers' e4m3 weights, fp32 scales and biases alike) is packed, block by block,
into one host buffer per block, registered with CUDA (page-locked: copies from it are DMA, and
asynchronous). The block's tensors become views of that buffer and their device copies are freed as
they are packed: the weights exist once, in host memory. Everything outside the blocks (patch, text,
time and image embeddings, audio projection, head: 0.9 GiB) is moved to `device` and stays there.
The host buffers are registered with cudaHostRegister rather than taken from PyTorch's pinned-memory
allocator, which rounds every allocation up to a power of two (a 0.54 GiB fp8 block would hold 1 GiB).

How a forward runs (hooks on each block; the block's forward, compiled or not, is untouched):
  block i starts  queue the copies of blocks i..i+ahead not yet queued: each one device allocation
                  and one host-to-device copy of the whole block on a side stream, then an event;
                  the compute stream waits for block i's event only, and block i's tensors are
                  pointed at its device copy
  block i ends    its tensors point back at host memory and the device copy is released
So the device holds at most ahead + 1 blocks (0.86 GiB each in bf16, 0.54 GiB in fp8 with FP8_KEEP; measured)
besides the non-block weights and the activations. The first block of a forward waits for its own
copy (nothing is fetched between forwards, so the VAE decode after the last step has the memory).

Stream order: a block's device buffer is allocated on the compute stream, and its copy first waits
for the compute stream to reach the point of that allocation (the start of block i - ahead). The
buffer's memory is therefore never written while earlier kernels may still read it, and the caching
allocator can hand freed blocks back in stream order. (record_stream would not do: the CPU runs many
blocks ahead of the GPU, and memory it holds back until the GPU catches up would pile up copies.)

CUDA only: with the model on the CPU the weights are in host memory already (KernelUnavailable).
After offload_blocks, do not move the model with `.to()`: that would copy the blocks back whole.
"""

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.kernels import KernelUnavailable

log = logging.getLogger(__name__)

GiB = 2**30
ALIGN = 256  # bytes: every tensor's offset in a block buffer (cuBLAS and _scaled_mm want >= 16)


def _check(error, what: str) -> None:
    if int(error) != 0:
        raise RuntimeError(f"{what} failed with CUDA error {int(error)}")


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: CUDA may be gone already
        pass


@dataclass
class _Slot:
    """One tensor of a block: where it is attached and where it sits in the block's buffer."""

    module: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    offset: int
    dtype: torch.dtype
    shape: torch.Size


class _BlockWeights:
    """One block's tensors packed into one page-locked host buffer."""

    def __init__(self, block: nn.Module):
        self.slots: list[_Slot] = []
        tensors: list[torch.Tensor] = []
        offsets: dict[int, int] = {}  # a tensor attached twice is stored once
        size = 0
        for module in block.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    if tensor.device.type == "meta":
                        raise ValueError(f"offload_blocks: {type(module).__name__}.{name} is on the meta device "
                                         "(load the weights first)")
                    if id(tensor) not in offsets:
                        offsets[id(tensor)] = size
                        tensors.append(tensor)
                        size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
                    self.slots.append(_Slot(module, kind, name, offsets[id(tensor)], tensor.dtype, tensor.shape))
        self.nbytes = max(size, ALIGN)
        self.host = torch.empty(self.nbytes, dtype=torch.uint8)
        ptr = self.host.data_ptr()
        _check(torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0), "cudaHostRegister")
        self._unregister = weakref.finalize(self, _unregister, ptr)
        for tensor in tensors:
            self._view(self.host, offsets[id(tensor)], tensor.dtype, tensor.shape).copy_(tensor)
        del tensors
        self.point_to(self.host)  # the originals (on the GPU or the CPU) are freed here

    @staticmethod
    def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        nbytes = shape.numel() * dtype.itemsize
        return flat[offset : offset + nbytes].view(dtype).view(shape)

    def point_to(self, flat: torch.Tensor) -> None:
        """Attach the block's tensors as views of `flat` (the host buffer or a device copy of it)."""
        for slot in self.slots:
            tensor = self._view(flat, slot.offset, slot.dtype, slot.shape)
            if slot.kind == "_parameters":
                tensor = nn.Parameter(tensor, requires_grad=False)
            getattr(slot.module, slot.kind)[slot.name] = tensor


class BlockOffload:
    """The state of `offload_blocks` for one model: the blocks' host buffers, the copy stream and the
    device copies in flight."""

    def __init__(self, model: nn.Module, device: torch.device, ahead: int):
        self.device, self.ahead = device, ahead
        self.blocks = list(model.blocks)
        self.weights = [_BlockWeights(block) for block in self.blocks]
        self.stream = torch.cuda.Stream(device)
        self.in_flight: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self.handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i), always_call=True))

    @property
    def host_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    def _fetch(self, i: int) -> None:
        """Queue block i's copy to the device (see the module docstring for the stream order)."""
        if i >= len(self.blocks) or i in self.in_flight:
            return
        weights = self.weights[i]
        buffer = torch.empty(weights.nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ready = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            buffer.copy_(weights.host, non_blocking=True)
            ready.record(self.stream)
        self.in_flight[i] = (buffer, ready)

    def _before(self, i: int) -> None:
        if i == 0:
            self.reset()
        for j in range(i, i + self.ahead + 1):
            self._fetch(j)
        buffer, ready = self.in_flight[i]
        torch.cuda.current_stream(self.device).wait_event(ready)
        self.weights[i].point_to(buffer)

    def _after(self, i: int) -> None:
        self.weights[i].point_to(self.weights[i].host)
        self.in_flight.pop(i, None)  # the device copy is freed, in the compute stream's order

    def reset(self) -> None:
        """Drop every device copy (a forward that stopped half-way leaves some); blocks back on the host."""
        for i in list(self.in_flight):
            self.weights[i].point_to(self.weights[i].host)
        self.in_flight.clear()


def offload_problem(device: torch.device | str) -> str | None:
    """Why blocks cannot be offloaded to `device`, or None if they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"it streams weights to a CUDA GPU and the device is {device} (on the CPU the weights are in "
                "host memory already: use a memory setting without offload)")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def check_offload(device: torch.device | str) -> None:
    problem = offload_problem(device)
    if problem is not None:
        raise KernelUnavailable(f"block offload cannot run on {device}: {problem}")


def offload_blocks(model: nn.Module, device: torch.device | str, ahead: int = 2) -> BlockOffload:
    """Keep `model.blocks` in page-locked host memory and stream each block to `device` on a side CUDA
    stream `ahead` blocks before its use; move everything else to `device`. The model's weights may be
    anywhere (CPU or GPU) when it is called; they end up held once. Returns the offload's state (also
    kept on the model's hooks, which hold it alive as long as the model)."""
    check_offload(device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if ahead < 0:
        raise ValueError(f"offload_blocks: ahead must be >= 0, got {ahead}")
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("the model has no blocks to offload")
    in_blocks = {id(m) for block in blocks for m in block.modules()} | {id(model.blocks)}
    for module in model.modules():  # the rest moves to the device, tensor by tensor
        if id(module) in in_blocks:
            continue
        for kind in ("_parameters", "_buffers"):
            entries = getattr(module, kind)
            for name, tensor in list(entries.items()):
                if tensor is not None and tensor.device != device:
                    moved = tensor.detach().to(device)
                    entries[name] = nn.Parameter(moved, requires_grad=False) if kind == "_parameters" else moved
    state = BlockOffload(model, device, ahead)
    torch.cuda.empty_cache()  # hand the blocks' device memory back
    rest = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if not n.startswith("blocks."))
    log.info("offload_blocks: %d blocks in %.2f GiB of page-locked host memory (%.2f GiB per block), streamed to "
             "%s %d ahead; the rest (%.2f GiB) on %s",
             len(blocks), state.host_bytes / GiB, state.host_bytes / len(blocks) / GiB, device, ahead, rest / GiB, device)
    return state
