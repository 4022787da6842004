"""capture: live Python objects <-> self-describing msgpack bundles of source and data.

User code travels as source text with its original file name and line; the destination
recompiles it. Objects from modules the destination has (``policy.provides``) travel by
name. Tensors and arrays travel as raw frames. No pickle, no marshal, no bytecode.

    data = capture.dumps(obj)            # bytes
    obj = capture.loads(data)            # a fresh copy, in fresh namespaces

Loading rebuilds code: a bundle from someone you do not trust is read with
``capture.loads(data, policy=capture.DATA_ONLY)``, which rebuilds values only.

``encode``/``decode`` are the same with the frames kept apart, for transports that move
large buffers separately (the runner puts them in shared memory).
"""
from __future__ import annotations

import hashlib as _hashlib
from typing import Any, Callable, Container, MutableMapping, Sequence

from . import decoder as _decoder, format as _format
from .dataonly import DATA_ONLY, DataDecoder, DataOnly
from .decoder import Decoder, Unavailable, plan_cache_info
from .destination import DEFAULT, DefaultDestination, Destination
from .encoder import Bundle, Encoder
from .errors import BundleError, CaptureError, MissingSources
from .source import compile_segment, release_lines

__all__ = [
    "dumps", "loads", "encode", "encode_variables", "decode", "Bundle", "CaptureError", "BundleError",
    "MissingSources",
    "Destination", "DefaultDestination", "DEFAULT", "DATA_ONLY", "DataOnly", "Unavailable", "compile_cache_info",
    "release_lines", "clear_caches", "plan_cache_info",
]


def encode(obj: Any, *, policy: Any = None, persistent_id: Callable[[Any], str | None] | None = None,
           known_sources: Container[str] = (), label: str = "obj") -> Bundle:
    """Encode ``obj`` into a :class:`Bundle` (header + frames that view the original memory).

    ``policy`` says what the destination has (default: the stdlib, torch, numpy,
    transformers, einops). ``persistent_id(obj)`` may return a token for objects the
    receiver supplies itself. Source segments whose digest is in ``known_sources`` are
    sent by digest only (the receiver has them; see ``decode(source_store=...)``).
    ``label`` starts the paths named in a :class:`CaptureError`.
    """
    encoder = Encoder(policy, persistent_id, known_sources)
    return encoder.bundle(encoder.value(obj, label))


def encode_variables(variables: dict[str, Any], *, policy: Any = None,
                     persistent_id: Callable[[Any], str | None] | None = None,
                     known_sources: Container[str] = ()) -> Bundle:
    """Encode a dict of named values (a call's ``fn``/``args``/``kwargs``, a trace's
    variables); error paths start at the names: ``args[0].config['db']``."""
    encoder = Encoder(policy, persistent_id, known_sources)
    return encoder.bundle(encoder.variables(variables))


def dumps(obj: Any, *, policy: Any = None) -> bytes:
    """Serialize ``obj`` to bundle bytes, like ``pickle.dumps``; raises :class:`CaptureError`."""
    return encode(obj, policy=policy).to_bytes()


def decode(header: bytes | memoryview, frames: Sequence[Any], *, policy: Any = None,
           persistent_load: Callable[[str], Any] | None = None, device: str | None = None,
           source_store: MutableMapping[str, str] | None = None, label: str = "obj", tenant: str = "") -> Any:
    """Rebuild the object of a bundle given as header bytes and frames.

    Writable frames (shared memory) become the tensors' memory without a copy; read-only
    ones are copied once. ``device`` overrides where tensors go (default: where they were,
    if that device exists here, else the CPU). ``source_store`` (digest -> text) is where
    a long-lived receiver remembers sources; segments sent by digest only are read from
    it, and :class:`MissingSources` lists those it lacks. ``tenant``: whose bundle this is,
    on a receiver serving several senders; compiled code is cached per tenant, so no
    sender's code objects are shared with another's. Raises :class:`BundleError`;
    imports the policy refuses raise its ``ImportError``.

    Rebuilding runs the bundle's code (class statements, constructors it names) under
    ``policy``: with ``policy=DATA_ONLY`` only values are rebuilt, and anything else is a
    :class:`BundleError` naming its path from ``label`` (``result[2].probe.fn``).
    """
    frames = [_bytes_view(f) for f in frames]
    key = None
    if not isinstance(policy, DataOnly):
        key = _decoder.plan_key("decode", _bytes_view(header), policy or DEFAULT, tenant)
        plan = _decoder.cached_plan(key, policy or DEFAULT)
        if plan is not None:
            return _replay(plan, frames, persistent_load, device, source_store)
    parsed, size = _format.unpack_header(header)
    return _decode(parsed, frames, policy, persistent_load, device, source_store, label, tenant, key, size)


def loads(data: bytes | bytearray | memoryview, *, policy: Any = None,
          persistent_load: Callable[[str], Any] | None = None, device: str | None = None,
          source_store: MutableMapping[str, str] | None = None, label: str = "obj", tenant: str = "") -> Any:
    """Rebuild the object in bundle bytes, like ``pickle.loads``; raises :class:`BundleError`.

    Like ``pickle.loads``, this runs code the bundle carries unless ``policy`` restricts
    it: read untrusted bytes with ``policy=DATA_ONLY`` (see :func:`decode`).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BundleError(f"loads expects bytes, not {type(data).__name__}")
    view = _bytes_view(data)
    key = None
    if not isinstance(policy, DataOnly):
        key = _decoder.plan_key("loads", view, policy or DEFAULT, tenant)
        plan = _decoder.cached_plan(key, policy or DEFAULT)
        if plan is not None and (not plan.header_digest
                                 or _hashlib.sha256(view[:plan.header_end]).digest() == plan.header_digest):
            frames = _format.split_frames(view, plan.header_end, plan.frame_table)
            return _replay(plan, frames, persistent_load, device, source_store)
    header, start = _format.unpack_header(view)
    frames = _format.split_frames(view, start, header["frames"])
    return _decode(header, frames, policy, persistent_load, device, source_store, label, tenant, key, start,
                   view)


def _bytes_view(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _decode(header: dict, frames: list, policy: Any, persistent_load: Any, device: str | None,
            source_store: MutableMapping[str, str] | None, label: str, tenant: str = "", key: tuple | None = None,
            header_end: int = 0, whole: memoryview | None = None) -> Any:
    """A first load; with ``key``, its plan is kept for the next load of the same bytes
    (``header_end``: where the header ends, or the frame area of ``whole``, ``loads``' bytes)."""
    if len(frames) != len(header["frames"]):
        raise BundleError(f"the bundle lists {len(header['frames'])} frames but {len(frames)} came with it")
    try:
        if isinstance(policy, DataOnly):
            return DataDecoder(header, frames, policy, persistent_load, device, source_store, label=label).root()
        decoder = Decoder(header, frames, policy, persistent_load, device, source_store, tenant=tenant,
                          record=key is not None)
        value = decoder.root()
        if key is not None:
            plan = decoder.plan()
            if whole is not None:
                plan.header_end, plan.frame_table = header_end, header["frames"]
                if header_end > _decoder.PREFIX:  # the key covers only the first bytes: check the rest on use
                    plan.header_digest = _hashlib.sha256(whole[:header_end]).digest()
            _decoder.keep_plan(key, plan, header_end)
        return value
    except RecursionError:
        raise BundleError("the bundle nests too deeply to rebuild") from None
    except (BundleError, ImportError):
        raise
    except Exception as exc:  # whatever a hostile bundle provokes outside one node is still this bundle's fault
        raise BundleError(f"cannot rebuild the bundle: {type(exc).__name__}: {exc}") from exc


def _replay(plan: Any, frames: list, persistent_load: Any, device: str | None,
            source_store: MutableMapping[str, str] | None) -> Any:
    try:
        return plan.instantiate(frames, persistent_load, device, source_store)
    except (BundleError, ImportError):
        raise
    except Exception as exc:  # as in _decode
        raise BundleError(f"cannot rebuild the bundle: {type(exc).__name__}: {exc}") from exc


def clear_caches() -> None:
    """Forget compiled code and load plans: a receiver does this before serving another
    tenant, so no code object of one sender's bundles stays alive for the next."""
    compile_segment.cache_clear()
    _decoder.clear_plans()


def compile_cache_info() -> Any:
    """Hits and misses of the per-segment compile cache (long-lived workers reuse it)."""
    return compile_segment.cache_info()
