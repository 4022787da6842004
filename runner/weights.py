"""The model's CPU parameters, moved at start-up into one mapping the kernel keeps read-only.

A request that writes to a parameter (``weight.data.add_(1)``, ``copy_``,
``load_state_dict``) then faults: the worker dies of SIGSEGV before anything else runs on
the changed weight, and the supervisor starts a fresh one. So the check after every request
(``runner.hygiene``) need not hash these parameters: it still confirms each one points where
it pointed at start-up (``param.data = other`` is found there), and hashes what is not in
the mapping (buffers, which some models rewrite in their forward, and storages on a GPU).

The mapping is anonymous memory made with libc's ``mmap``, not Python's: no Python object
with ``madvise``, ``resize`` or ``close`` exists for a request to find (``MADV_REMOVE``
through such an object would zero the weights without a fault). Only code that reaches
``mprotect`` or ``madvise`` itself (ctypes, raw memory) could undo it, and such code can undo
any in-process check (docs/SECURITY.md, "Limits").
"""
from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

_ALIGN = 64  # every storage starts on a cache line: a multiple of any dtype's size


class ReadOnlyParameters:
    """Where the parameters now live: ``holds(address)`` says whether a storage is there.
    ``left_behind``: byte views of old storages something besides the model's parameters
    and buffers still viewed when they moved (a cached ``weight.t()``): still writable, so
    the hygiene fingerprints them."""

    def __init__(self, start: int, length: int, left_behind: list):
        self.start, self.length, self.left_behind = start, length, left_behind

    def holds(self, address: int) -> bool:
        return self.start <= address < self.start + self.length


def protect(module: Any, torch: Any) -> ReadOnlyParameters | None:
    """Move ``module``'s dense CPU parameters (tied ones once, and buffers viewing the same
    memory) into one read-only mapping; ``None`` when it has none, or when this torch cannot
    tell what else views their memory. Run once, before the warm-up and the hygiene baseline."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None  # every storage stays where it is, fingerprinted
    storages: dict[int, tuple[Any, list]] = {}
    for parameter in {id(p): p for _, p in module.named_parameters(remove_duplicate=False)}.values():
        storage = parameter.untyped_storage()
        if parameter.device.type == "cpu" and parameter.layout == torch.strided and storage.nbytes():
            storages.setdefault(storage.data_ptr(), (storage, []))[1].append(parameter)
    if not storages:
        return None
    for buffer in {id(b): b for _, b in module.named_buffers(remove_duplicate=False)}.values():
        shared = storages.get(buffer.untyped_storage().data_ptr()) if buffer.layout == torch.strided else None
        if shared is not None:
            shared[1].append(buffer)
    offsets, size = [], 0
    for storage, _ in storages.values():
        offsets.append(size)
        size += -(-storage.nbytes() // _ALIGN) * _ALIGN
    length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    address = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        _raise_errno("mmap of room for the model's parameters")
    # Never unmapped: the parameters live as long as the worker.
    base = torch.frombuffer((ctypes.c_uint8 * length).from_address(address), dtype=torch.uint8)
    left_behind = []
    with torch.no_grad():
        for offset, (storage, tensors) in zip(offsets, storages.values()):
            base[offset:offset + storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
            for tensor in tensors:
                tensor.data = torch.empty(0, dtype=tensor.dtype).set_(
                    base.untyped_storage(), offset // tensor.element_size() + tensor.storage_offset(),
                    tensor.size(), tensor.stride())
            if use_count(storage._cdata) > 1:  # ours is the one reference left, unless something else views it
                left_behind.append(torch.empty(0, dtype=torch.uint8).set_(storage))
    if libc.mprotect(address, length, mmap.PROT_READ) != 0:
        _raise_errno("mprotect of the model's parameters")
    return ReadOnlyParameters(address, length, left_behind)


def _raise_errno(what: str) -> None:
    error = ctypes.get_errno()
    raise OSError(error, f"{what} failed: {os.strerror(error)}")
