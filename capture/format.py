"""The bundle format, in one place: container layout, header fields and node tags.

docs/FORMAT.md is the prose version of this file; tests/test_format_docs.py checks that
they name the same tags and header keys, and tests/test_golden_bundles.py that bundles of
FORMAT_VERSION written earlier still load (a change that breaks them bumps the version).

A bundle is one msgpack map (the *header*) followed by raw *frames*::

    [msgpack header][zero padding to a multiple of 64][frame 0][pad][frame 1]...

Frame offsets in the header are relative to the start of the frame area, which begins
at the first multiple of ``ALIGN`` at or after the header's end, so a reader needs no
length prefix: it unpacks one msgpack object and knows where the frames start.

Inside the header, every value that is not a msgpack scalar (nil, bool, int, float,
str, bin) is a reference to a node: ``ExtType(REF, uint32 big-endian index)``. Nodes
are msgpack arrays ``[tag, field, ...]`` in ``header["nodes"]``; sharing and cycles are
expressed by two references to one index.
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

import msgpack

from .errors import BundleError

FORMAT_NAME = "sourcebox.bundle"
FORMAT_VERSION = 1
ALIGN = 64
EXT_REF = 1
_REF = struct.Struct(">I")

# Node tags. The fields of each are listed in docs/FORMAT.md.
LIST, TUPLE, DICT, SET, FROZENSET, BYTEARRAY = "list", "tuple", "dict", "set", "frozenset", "bytearray"
BIGINT, COMPLEX = "bigint", "complex"
REFERENCE = "ref"            # [module, qualname]: an object the destination has, by name
MODULE = "module"            # [module_index]: a shipped user module as a module object
FUNCTION = "function"        # [map]: a function rebuilt from a source segment
CELL = "cell"                # [] or [value]: a closure cell (empty when unbound)
CLASS = "class"              # [map]: a class rebuilt by running its class statement
ATTRIBUTE = "getattr"        # [obj, name]: an attribute of another node (methods, nested classes)
BOUND_METHOD = "method"      # [func, self]
WRAPPER = "wrap"             # [kind, func]: staticmethod / classmethod
PROPERTY = "property"        # [fget, fset, fdel, doc]
LRU_CACHE = "lru_cache"      # [func, maxsize, typed]
OBJECT = "object"            # [cls, args, kwargs, state, listitems, dictitems]: cls.__new__ + state
REDUCE = "reduce"            # [callable, args, state, listitems, dictitems]: callable(*args) + state
TENSOR = "tensor"            # [TENSOR_FIELDS...]: a torch tensor over a storage frame
NDARRAY = "ndarray"          # [frame, dtype str, shape]
BYTES_FRAME = "bytesframe"   # [frame]: a large bytes value kept out of the msgpack body
UNAVAILABLE = "unavailable"  # [description]: a module-level name that could not travel
PERSISTENT = "persistent"    # [token]: an object the receiver supplies (its model, say)
NAMEDTUPLE = "namedtuple"    # [typename, fields, defaults, module, qualname]: a collections.namedtuple class
SURROGATE_STR = "surrogates"  # [bin]: a str with lone surrogates, as UTF-8 with surrogatepass
ORDERED_DICT = "odict"       # [[key, value], ...]: a collections.OrderedDict (nn.Module holds many)
STRING = "str"               # [str]: a string that recurs (attribute names in object state), sent once

TAGS = frozenset({
    LIST, TUPLE, DICT, SET, FROZENSET, BYTEARRAY, BIGINT, COMPLEX, REFERENCE, MODULE,
    FUNCTION, CELL, CLASS, ATTRIBUTE, BOUND_METHOD, WRAPPER, PROPERTY, LRU_CACHE, OBJECT,
    REDUCE, TENSOR, NDARRAY, BYTES_FRAME, UNAVAILABLE, PERSISTENT, NAMEDTUPLE, SURROGATE_STR, ORDERED_DICT, STRING,
})

#: The fields of a tensor node, in order (positional: a model has hundreds of tensors).
TENSOR_FIELDS = ("storage", "dtype", "shape", "stride", "offset", "requires_grad", "parameter", "device")

#: Header keys: format, version, python (producer's, information only), policy, root,
#: nodes, sources, modules, frames ([[offset, length], ...] in the frame area).
HEADER_KEYS = ("format", "version", "python", "policy", "root", "nodes", "sources", "modules", "frames")


class Ref:
    """A reference to node ``index`` while a header is being built or read."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.index == self.index

    def __hash__(self) -> int:
        return hash(("ref", self.index))

    def __repr__(self) -> str:
        return f"#{self.index}"


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, Ref):
        return msgpack.ExtType(EXT_REF, _REF.pack(obj.index))
    raise TypeError(f"not a bundle value: {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != EXT_REF or len(data) != _REF.size:
        raise BundleError(f"unknown msgpack extension type {code} ({len(data)} bytes)")
    return Ref(_REF.unpack(data)[0])


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, default=_pack_default, use_bin_type=True, strict_types=True)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def frame_table(frames: Sequence[memoryview]) -> list[list[int]]:
    """Offsets and lengths of ``frames`` laid out one after another, each aligned."""
    table, offset = [], 0
    for frame in frames:
        table.append([offset, frame.nbytes])
        offset = aligned(offset + frame.nbytes)
    return table


def join(header: bytes, frames: Sequence[memoryview]) -> bytes:
    """The single-buffer form of a bundle: header, padding, aligned frames."""
    return b"".join(join_parts(header, frames))


def join_parts(header: bytes, frames: Sequence[memoryview]) -> list:
    """The pieces ``join`` concatenates, uncopied, for a caller that puts more around them
    in the same single copy."""
    parts, position = [header], len(header)
    for frame in frames:
        pad = aligned(position) - position
        if pad:
            parts.append(b"\0" * pad)
        parts.append(frame)
        position += pad + memoryview(frame).nbytes
    return parts


_HEADER_CHUNK = 64 * 1024


class _Chunks:
    """A file-like reader over a buffer, handing out copies of only what is read."""

    def __init__(self, data: bytes | memoryview):
        self.view = memoryview(data)
        self.position = 0

    def read(self, size: int) -> bytes:
        chunk = self.view[self.position:self.position + size]
        self.position += len(chunk)
        return bytes(chunk)


def unpack_header(data: bytes | memoryview) -> tuple[dict, int]:
    """Parse the header at the start of ``data``; return it and where the frame area starts.

    Parsing runs no code: msgpack yields only scalars, arrays, maps and node references.
    """
    # Fed in chunks so the frames after the header are not copied into the unpacker.
    unpacker = msgpack.Unpacker(
        _Chunks(data), read_size=_HEADER_CHUNK, raw=False, strict_map_key=False, ext_hook=_ext_hook,
        use_list=True, max_buffer_size=max(len(data), _HEADER_CHUNK),
    )
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        raise BundleError("truncated bundle: the header ends before its declared size") from None
    except BundleError:
        raise
    except msgpack.StackError:
        raise BundleError("malformed bundle header: it nests more deeply than a header may") from None
    except Exception as exc:  # msgpack reports malformed input with assorted types
        raise BundleError(f"malformed bundle header: {exc}") from None
    check_header(header)
    return header, aligned(unpacker.tell())


def describe(value: Any) -> str:
    """A short, bounded description of a header value for an error message: a hostile
    value may be nested thousands deep (``repr`` recurses) or megabytes long."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:40]) + ("..." if len(value) > 40 else "")
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_header(header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise BundleError(f"not a sourcebox bundle (expected a header map with format {FORMAT_NAME!r})")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {describe(version)} is not readable by this sourcebox "
            f"(reads version {FORMAT_VERSION}); use the same sourcebox release on both sides"
        )
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise BundleError(f"bundle header lacks {', '.join(missing)}")
    for key, kind in (("nodes", list), ("sources", list), ("modules", list), ("frames", list)):
        if not isinstance(header[key], kind):
            raise BundleError(f"bundle header field {key!r} must be a {kind.__name__}")


def split_frames(data: memoryview, start: int, table: Any) -> list[memoryview]:
    """Slice the frame area of a single-buffer bundle into its frames, checking bounds."""
    frames = []
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 2 and all(type(v) is int and v >= 0 for v in entry)):
            raise BundleError(f"bad frame table entry {describe(entry)}: expected [offset, length], "
                             "two non-negative integers")
        offset, length = entry
        begin = start + offset
        if begin + length > len(data):
            raise BundleError(
                f"truncated bundle: frame at {begin} of {length} bytes runs past the end ({len(data)} bytes)"
            )
        frames.append(data[begin:begin + length])
    return frames
