"""The worker's seccomp-bpf filter, built with libseccomp through ``pyseccomp``.

Default ALLOW with a deny list, not an allowlist: CUDA's user-space driver
issues a wide, version-dependent set of system calls (``ioctl`` on
``/dev/nvidia*``, ``mmap``/``mremap``/``madvise`` of device and pinned memory,
``memfd_create``, reads under ``/proc`` and ``/sys``), and an allowlist that
misses one breaks the GPU in ways that are hard to diagnose. Files and TCP are
Landlock's job; this filter removes the calls that let a process leave its
box: new processes, other processes, privileged kernel interfaces, network
sockets. docs/SANDBOX.md lists it and the reasons.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

# Refused outright with EPERM, grouped by why.
DENIED: dict[str, tuple[str, ...]] = {
    "new programs and processes": ("execve", "execveat", "fork", "vfork"),
    "other processes' memory and handles": (
        "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise",
        "kcmp", "pidfd_getfd", "pidfd_send_signal", "tkill",
    ),
    "mounts and namespaces": (
        "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
        "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    ),
    "privileged kernel interfaces": (
        "bpf", "keyctl", "add_key", "request_key", "perf_event_open",
        "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "reboot", "swapon", "swapoff", "syslog", "acct", "settimeofday", "clock_settime",
        "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm",
        "quotactl", "quotactl_fd", "lookup_dcookie", "fanotify_init",
        "name_to_handle_at", "open_by_handle_at", "uselib", "vhangup",
    ),
    "raising resource limits": ("setrlimit",),
    # Landlock (ABI 7) governs reading and writing, not metadata: a root worker
    # could chmod or chown any root-owned file it can name.
    "file metadata changes": (
        "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
        "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
        "utime", "utimes", "futimesat", "utimensat",
    ),
    # Outgoing connections of any family: the worker's transport is connected
    # before enter(); new connections would reach Unix sockets by path (e.g. a
    # container runtime's), which Landlock ABI 7 does not mediate.
    "new connections and filesystem watches": ("connect", "inotify_init", "inotify_init1"),
}

_CLONE_THREAD = 0x00010000
# Namespace flags: refused even on thread creation.
_CLONE_NAMESPACES = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
# Terminal ioctls that push input into (or drive) the controlling terminal of
# whoever started the worker. ioctl's request is 32 bits: compare those only,
# so high garbage bits cannot slip past.
_SOCKET_TYPE_MASK = 0xF  # the type bits, without SOCK_NONBLOCK / SOCK_CLOEXEC
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
_PR_SET_PDEATHSIG = 1
_MREMAP_DONTUNMAP = 4


@dataclass
class FilterPlan:
    """A built filter ready to load, and a description of it for reports."""

    filter: Any
    rules: list[str]
    unknown: list[str]


def build(own_pid: int) -> FilterPlan:
    """Build (not load) the filter; ``own_pid`` is the only signal target allowed."""
    import pyseccomp as sc

    eperm = sc.ERRNO(errno.EPERM)
    plan_rules: list[str] = []
    unknown: list[str] = []
    syscall_filter = sc.SyscallFilter(sc.ALLOW)
    # All threads, including those CUDA and torch started before the filter.
    syscall_filter.set_attr(sc.Attr.CTL_TSYNC, 1)
    # 32-bit (int 0x80) and x32 system calls from a 64-bit process: refuse all.
    syscall_filter.set_attr(sc.Attr.ACT_BADARCH, sc.ERRNO(errno.ENOSYS))

    def known(name: str) -> bool:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            unknown.append(name)
            return False
        return True

    for group, names in DENIED.items():
        present = [name for name in names if known(name)]
        for name in present:
            syscall_filter.add_rule(eperm, name)
        plan_rules.append(f"EPERM {group}: {', '.join(present)}")

    # Processes: clone only as a thread (glibc's pthread_create), never with new
    # namespaces; clone3 hides its flags in memory the filter cannot read, so it
    # gets ENOSYS and glibc falls back to clone.
    syscall_filter.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    for flag in _CLONE_NAMESPACES:
        syscall_filter.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    plan_rules.append("EPERM clone without CLONE_THREAD or with any CLONE_NEW* flag")
    if known("clone3"):
        syscall_filter.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        plan_rules.append("ENOSYS clone3 (glibc then uses clone)")

    # Network: Unix-domain stream sockets only (the worker's transport, and
    # socketpair). Datagram sockets are refused: they send to any socket path
    # without connect().
    for name in ("socket", "socketpair"):
        syscall_filter.add_rule(eperm, name, sc.Arg(0, sc.NE, socket.AF_UNIX))
        syscall_filter.add_rule(eperm, name, sc.Arg(1, sc.MASKED_EQ, _SOCKET_TYPE_MASK, socket.SOCK_DGRAM))
    plan_rules.append("EPERM socket/socketpair other than AF_UNIX, and AF_UNIX datagram sockets")

    # Signals only to this process.
    syscall_filter.add_rule(eperm, "kill", sc.Arg(0, sc.NE, own_pid))
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        syscall_filter.add_rule(eperm, name, sc.Arg(0, sc.NE, own_pid))
    plan_rules.append(f"EPERM kill/tgkill/rt_sigqueueinfo/rt_tgsigqueueinfo to any process but {own_pid}")

    for request in (_TIOCSTI, _TIOCLINUX):
        syscall_filter.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    plan_rules.append("EPERM ioctl TIOCSTI/TIOCLINUX (other ioctls, e.g. on /dev/nvidia*, allowed)")

    # The parent-death signal armed before enter() (the runner's worker dies with its
    # supervisor) stays: user code cannot clear or change it.
    syscall_filter.add_rule(eperm, "prctl", sc.Arg(0, sc.EQ, _PR_SET_PDEATHSIG))
    plan_rules.append("EPERM prctl(PR_SET_PDEATHSIG): the parent-death signal cannot be changed")

    # mremap with MREMAP_DONTUNMAP leaves a second mapping of the same pages behind: user
    # code could keep a view of a request's shared memory that the worker unmaps after it.
    syscall_filter.add_rule(eperm, "mremap", sc.Arg(3, sc.MASKED_EQ, _MREMAP_DONTUNMAP, _MREMAP_DONTUNMAP))
    plan_rules.append("EPERM mremap(MREMAP_DONTUNMAP): no hidden second mapping of shared memory")

    # Raising limits back: prlimit64 with a new limit; reading stays allowed.
    syscall_filter.add_rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0))
    plan_rules.append("EPERM prlimit64 that sets a limit (getrlimit still works)")
    return FilterPlan(syscall_filter, plan_rules, unknown)


def load(plan: FilterPlan) -> None:
    """Load the filter into the kernel for every thread of the process."""
    plan.filter.load()


def active_mode() -> int:
    """The ``Seccomp:`` field of /proc/self/status (0 off, 1 strict, 2 filter)."""
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
