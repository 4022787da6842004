"""Landlock through raw system calls (no binding exists in the standard library).

Landlock lets an unprivileged process restrict its own file-system access (and,
from ABI 4, TCP bind/connect; from ABI 6, abstract Unix sockets and signals)
to an allowlist. Once applied it cannot be lifted, and threads the restricted
thread starts afterwards inherit it. See docs/SANDBOX.md, "The OS layer".
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass, field

# System-call numbers: the same on x86_64 and aarch64 (the unified table).
_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}

_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

# File-system access rights (linux/landlock.h), with the ABI that introduced them.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_ALL_FS_RIGHTS = (1 << 16) - 1  # ABI 5 and later

# Rights that make sense on a file (the kernel refuses directory rights there).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

# ABI 4: TCP; ABI 6: scopes.
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1

READ = READ_FILE | READ_DIR
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV
WRITE = (
    READ
    | WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_SYM
    | REFER
    | TRUNCATE
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class LandlockError(OSError):
    """Landlock is missing or a Landlock call failed."""


def _numbers() -> tuple[int, int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise LandlockError(f"Landlock system-call numbers are not known for {machine}")
    return _SYSCALLS[machine]


def abi_version() -> int:
    """The kernel's Landlock ABI version; raises :class:`LandlockError` with the reason if none."""
    create, _, _ = _numbers()
    result = _libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    if result < 0:
        error = ctypes.get_errno()
        reasons = {
            38: "the kernel has no Landlock support (ENOSYS: built without CONFIG_SECURITY_LANDLOCK)",
            95: "Landlock is built in but not enabled (EOPNOTSUPP: add landlock to the lsm= boot parameter)",
        }
        raise LandlockError(error, reasons.get(error, f"landlock_create_ruleset failed: {os.strerror(error)}"))
    return int(result)


@dataclass
class Ruleset:
    """Paths and the access each gets; everything else is denied once applied."""

    paths: dict[str, int] = field(default_factory=dict)

    def allow(self, path: str | os.PathLike[str], rights: int) -> None:
        """Grant ``rights`` beneath ``path`` (accumulates; missing paths are skipped at apply time)."""
        key = os.path.realpath(path)
        self.paths[key] = self.paths.get(key, 0) | rights


@dataclass
class Applied:
    """What :func:`restrict_self` enforced."""

    abi: int
    granted: list[tuple[str, int]]
    skipped: list[str]
    network: bool
    scoped: bool


def restrict_self(ruleset: Ruleset) -> Applied:
    """Apply ``ruleset`` to the calling thread and its future threads.

    Needs no-new-privs set first (or CAP_SYS_ADMIN). Rights the kernel's ABI
    does not know are dropped from the request (they are then not enforced and
    :class:`Applied` says so through ``abi``).
    """
    abi = abi_version()
    create, add_rule, restrict = _numbers()
    handled_fs = _FS_RIGHTS_BY_ABI.get(abi, _ALL_FS_RIGHTS)
    attr = _RulesetAttr(handled_access_fs=handled_fs)
    size = 8
    network = abi >= 4
    scoped = abi >= 6
    if network:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP  # no port rules: no TCP at all
        size = 16
    if scoped:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset_fd = _libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset_fd < 0:
        error = ctypes.get_errno()
        raise LandlockError(error, f"landlock_create_ruleset: {os.strerror(error)}")
    granted: list[tuple[str, int]] = []
    skipped: list[str] = []
    try:
        for path, rights in sorted(ruleset.paths.items()):
            try:
                path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                skipped.append(path)
                continue
            try:
                allowed = rights & handled_fs
                if not os.path.isdir(path):
                    allowed &= FILE_RIGHTS
                rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=path_fd)
                result = _libc.syscall(
                    add_rule, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)
                )
                if result < 0:
                    error = ctypes.get_errno()
                    raise LandlockError(error, f"landlock_add_rule for {path}: {os.strerror(error)}")
                granted.append((path, allowed))
            finally:
                os.close(path_fd)
        result = _libc.syscall(restrict, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
        if result < 0:
            error = ctypes.get_errno()
            raise LandlockError(error, f"landlock_restrict_self: {os.strerror(error)}")
    finally:
        os.close(ruleset_fd)
    return Applied(abi=abi, granted=granted, skipped=skipped, network=network, scoped=scoped)


def describe_rights(rights: int) -> str:
    """``rw`` / ``r`` / ``dev`` shorthand for a grant, for reports."""
    if rights & (MAKE_REG | REMOVE_FILE):
        return "read-write"
    if rights & IOCTL_DEV:
        return "device"
    if rights & WRITE_FILE:
        return "read-write"
    return "read-only"

