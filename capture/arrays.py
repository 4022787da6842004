"""Tensors and arrays as raw frames. torch and numpy are imported only when one is met,
so a bundle of plain code loads on an interpreter that has neither."""
from __future__ import annotations

import ctypes
import sys
from typing import Any

from .errors import BundleError


def is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_ndarray(obj: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray)


def storage_view(tensor: Any) -> tuple[Any, memoryview]:
    """The raw bytes of ``tensor``'s whole storage, without a copy for CPU tensors.

    Returns the (host) storage too: the caller keeps it alive as long as the view.
    """
    storage = tensor.untyped_storage()
    if storage.device.type != "cpu":
        storage = storage.cpu()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return storage, memoryview(b"")
    raw = (ctypes.c_char * nbytes).from_address(storage.data_ptr())
    return storage, memoryview(raw).cast("B")


def dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def storage_from_frame(frame: memoryview) -> Any:
    """A torch storage over ``frame``: shared when the frame is writable (shared memory),
    copied once when it is read-only (a ``bytes`` bundle)."""
    import torch

    if frame.nbytes == 0:
        return torch.UntypedStorage(0)
    if frame.readonly:
        frame = memoryview(bytearray(frame))  # one memcpy; cloning a read-only torch view is far slower
    return torch.frombuffer(frame, dtype=torch.uint8).untyped_storage()


def tensor_from_storage(storage: Any, meta: dict, device: str | None) -> Any:
    import torch

    # Read from torch's namespace: getattr would run torch's lazy submodule imports for a
    # name the bundle chose.
    name = meta["dtype"]
    dtype = vars(torch).get(name) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise BundleError(f"unknown tensor dtype {meta['dtype']!r}")
    shape, stride, offset = meta["shape"], meta["stride"], meta["offset"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    extent = offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1 if all(shape) else 0
    if extent * itemsize > storage.nbytes():
        raise BundleError(f"tensor of shape {shape} runs past its storage ({storage.nbytes()} bytes)")
    tensor = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
    target = device or meta["device"]
    if target != "cpu" and _device_available(torch, target):
        tensor = tensor.to(target)
    if meta["parameter"]:
        return torch.nn.Parameter(tensor, requires_grad=meta["requires_grad"])
    return tensor.requires_grad_(meta["requires_grad"]) if meta["requires_grad"] else tensor


def _device_available(torch: Any, device: str) -> bool:
    kind = device.partition(":")[0]
    return kind == "cuda" and torch.cuda.is_available() or kind == "mps" and torch.backends.mps.is_available()


def ndarray_frame(array: Any) -> tuple[Any, memoryview]:
    import numpy

    contiguous = numpy.ascontiguousarray(array)
    return contiguous, memoryview(contiguous.reshape(-1).view(numpy.uint8)) if contiguous.size else memoryview(b"")


def ndarray_from_frame(frame: memoryview, dtype: str, shape: list) -> Any:
    import numpy

    try:
        array = numpy.frombuffer(frame, dtype=numpy.dtype(dtype)).reshape(shape)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"array frame does not match dtype {dtype!r} and shape {shape}: {exc}") from None
    return array.copy() if frame.readonly else array
