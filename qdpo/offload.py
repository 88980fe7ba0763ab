"""offload_activations: what autograd saves in the policy forward waits in pinned host memory until backward.

torch's own save_on_cpu copies on the compute stream, so the copies take turns with compute instead of running
beside it, and it brings a tensor back only when backward asks for it. Here the copies run on a side CUDA stream:
in forward a tensor leaves while the next layer computes; in backward, each time a tensor is used the ones saved
just before it start coming back, so they arrive while the current layer's backward computes. With gradient
checkpointing a decoder layer saves one tensor outside its checkpoint (the layer's input), so one tensor ahead is
one layer ahead.

The bookkeeping (which tensor leaves, when each comes back) is kept apart from the copies (a Copier), so the CPU
tests check it with synchronous copies; on a GPU StreamCopier makes them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Protocol

import torch

# Tensors below this size stay where they are: a copy's fixed cost would outweigh the memory it frees.
MIN_BYTES = 1 << 20
# Copies in forward that may still be running; older ones are waited for (on the GPU, not by the CPU) so their
# sources can be freed. Two lets a copy overlap with the whole next layer.
IN_FLIGHT = 2


class Copier(Protocol):
    """Moves saved tensors to host memory and back; `done` values mark when a copy has finished."""

    def movable(self, t: torch.Tensor) -> bool: ...

    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]: ...

    def wait(self, done: Any) -> None: ...

    def release(self, t: torch.Tensor, done: Any) -> None: ...


class StreamCopier:
    """Copies on a side CUDA stream, into and out of pinned host memory; the compute stream waits on events."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    def movable(self, t: torch.Tensor) -> bool:
        """Only GPU tensors are worth moving."""
        return t.is_cuda

    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.cuda.Event, torch.device]]:
        """Start copying t (dense) into pinned host memory of the same layout."""
        side = self._side(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # t's producer has run
        with torch.cuda.stream(side):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host, (side.record_event(), t.device)

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, tuple]:
        """Start copying a host tensor back; the GPU memory belongs to the compute stream, which frees it later."""
        compute = torch.cuda.current_stream(device)
        out = torch.empty_like(host, device=device)
        side = self._side(device)
        # out may reuse memory that compute work still queued is reading: write only after that work.
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            out.copy_(host, non_blocking=True)
            return out, (side.record_event(), device)

    def wait(self, done: tuple[torch.cuda.Event, torch.device]) -> None:
        """Make the compute stream wait for a copy (the CPU does not wait)."""
        event, device = done
        torch.cuda.current_stream(device).wait_event(event)

    def release(self, t: torch.Tensor, done: tuple[torch.cuda.Event, torch.device]) -> None:
        """t is about to be dropped with its copy perhaps still running: the allocator waits for the side stream."""
        t.record_stream(self._side(done[1]))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill a block of memory exactly once, in some order of its dimensions."""
    span = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1:
            if stride != span:
                return False
            span *= size
    return True


def _dead() -> None:
    """A weak reference whose object is gone."""


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (linear layers save weight.t())."""
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class _Saved:
    """An offloaded tensor as autograd keeps it until backward has used it: its host copy, and once back, its GPU
    copy (a tensor saved by two operations is offloaded once and comes back once)."""

    __slots__ = ("index", "host", "device", "back", "__weakref__")

    def __init__(self, index: int, host: torch.Tensor, device: torch.device) -> None:
        self.index, self.host, self.device = index, host, device
        self.back: torch.Tensor | None = None


class _Traffic:
    """The copies of one forward and its backward: those leaving, those fetched early.

    Autograd holds each _Saved, so a host copy is freed as soon as backward is done with it; this object holds only
    weak references to them, and autograd's unpack hook holds this object, so it lives exactly as long as the graph
    (nothing here refers back to the context, so there is no cycle for the garbage collector to find late).
    """

    def __init__(self, copier: Copier, min_bytes: int, in_flight: int) -> None:
        self.copier = copier
        self.min_bytes = min_bytes
        self.in_flight = in_flight
        self.saved: list[weakref.ref] = []  # by index, in the order forward saved them
        # Forward copies that may be running, oldest first: (source kept alive, done, its version at save).
        self.leaving: dict[int, tuple[torch.Tensor, Any, int]] = {}
        self.arriving: dict[int, tuple[torch.Tensor, Any]] = {}  # fetched early in backward, not yet used
        self.requested: set[int] = set()  # brought back (or on their way)
        self.last_saved: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}  # id(tensor) -> it, version, its copy
        # Autograd runs CPU and GPU nodes on different threads: a graph with both may unpack concurrently.
        self.lock = threading.Lock()

    def pack(self, t: torch.Tensor) -> torch.Tensor | _Saved:
        """Forward: start t's copy to host memory (or keep t, if not worth a copy)."""
        # Weights stay; so do broadcast views, whose copy would be larger than the memory they hold.
        if (
            _is_weight(t)
            or _nbytes(t) < self.min_bytes
            or t.untyped_storage().nbytes() < _nbytes(t)
            or not self.copier.movable(t)
        ):
            return t
        with self.lock:
            tensor, version, copy = self.last_saved.get(id(t), (_dead, -1, _dead))
            if tensor() is t and version == t._version and copy() is not None:
                return copy()  # the same tensor, unchanged, saved again (e.g. both uses of a norm's input)
            source = t if _dense(t) else t.contiguous()  # a dense tensor's copy is one memcpy, and keeps its strides
            host, done = self.copier.to_host(source)
            saved = _Saved(len(self.saved), host, t.device)
            self.saved.append(weakref.ref(saved))
            self.last_saved[id(t)] = (weakref.ref(t), t._version, weakref.ref(saved))
            self.leaving[saved.index] = (source, done, source._version)  # source's memory stays in use until copied
            while len(self.leaving) > self.in_flight:
                self._settle(self.leaving.pop(next(iter(self.leaving))))
            return saved

    def _settle(self, leaving: tuple[torch.Tensor, Any, int]) -> torch.Tensor:
        source, done, version = leaving
        if source._version != version:
            # Autograd skips its own check when saved-tensor hooks are set; this copy may have read a half-written
            # tensor, so refuse as autograd would.
            raise RuntimeError(
                "a tensor saved for backward was modified in place while offload_activations was copying it"
            )
        self.copier.wait(done)
        return source

    def unpack(self, saved: torch.Tensor | _Saved) -> torch.Tensor:
        """Backward: the tensor on its device, and the ones saved just before it on their way."""
        if isinstance(saved, torch.Tensor):
            return saved
        with self.lock:
            if saved.back is not None:
                return saved.back
            i = saved.index
            if i in self.leaving:
                t = self._settle(self.leaving.pop(i))
            else:
                t, done = (
                    self.arriving.pop(i) if i in self.arriving else self.copier.to_device(saved.host, saved.device)
                )
                self.copier.wait(done)
            saved.back = t
            self.requested.add(i)
            self._fetch_below(i, _nbytes(t))
            return t

    def _fetch_below(self, index: int, need: int) -> None:
        """Start bringing back the tensors saved just before index, until about need bytes are on their way."""
        coming = sum(_nbytes(t) for j, (t, _) in self.arriving.items() if j < index)
        j = index - 1
        while coming < need and j >= 0:
            saved = self.saved[j]()
            if saved is not None and j not in self.requested and j not in self.leaving:
                self.arriving[j] = self.copier.to_device(saved.host, saved.device)
                self.requested.add(j)
                coming += _nbytes(saved.host)
            j -= 1

    def __del__(self) -> None:
        # A copy still running into or out of GPU memory about to be freed (an early fetch backward never used, a
        # forward never backpropagated): the allocator must not hand that memory out before the copy ends.
        for t, done, *_ in (*self.leaving.values(), *self.arriving.values()):
            self.copier.release(t, done)


class OffloadedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors go to host memory in forward and come back about one tensor ahead of their use in backward.

    Use as a context around a forward; backward may run after it has exited. A tensor still on the GPU when
    backward asks for it (the last ones saved) is used as it is. A tensor backward asks for out of order is
    fetched at once: prediction only decides what is fetched early, never what is used.
    """

    def __init__(self, copier: Copier, min_bytes: int = MIN_BYTES, in_flight: int = IN_FLIGHT) -> None:
        self.traffic = _Traffic(copier, min_bytes, in_flight)
        super().__init__(self.traffic.pack, self.traffic.unpack)


@functools.cache
def _stream_copier() -> StreamCopier:
    return StreamCopier()  # one side stream per device for the whole run


def offload_hooks() -> contextlib.AbstractContextManager:
    """The offloading context for the policy forward: side-stream copies on a GPU; nothing on the CPU, where the
    saved tensors are in host memory already."""
    if torch.cuda.is_available():
        return OffloadedActivations(_stream_copier())
    return contextlib.nullcontext()
