"""Top-level standard-library module names per Python minor version.

Environment snapshots name a Python version, and the stdlib differs between
versions (PEP 594 removals, new private helpers), so a policy built from a 3.12
snapshot must not allow what only 3.11 has. The lists are each interpreter's
own ``sys.stdlib_module_names``, recorded from CPython 3.10.13, 3.11.7, 3.12.1
and 3.13.0 as the 3.11 list plus per-version additions and removals.
"""

from __future__ import annotations

import sys

_PYTHON_311 = frozenset(
    """
    __future__ _abc _aix_support _ast _asyncio _bisect _blake2 _bootsubprocess _bz2
    _codecs _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr _codecs_tw
    _collections _collections_abc _compat_pickle _compression _contextvars _crypt _csv
    _ctypes _curses _curses_panel _datetime _dbm _decimal _elementtree _frozen_importlib
    _frozen_importlib_external _functools _gdbm _hashlib _heapq _imp _io _json _locale
    _lsprof _lzma _markupbase _md5 _msi _multibytecodec _multiprocessing _opcode
    _operator _osx_support _overlapped _pickle _posixshmem _posixsubprocess _py_abc
    _pydecimal _pyio _queue _random _scproxy _sha1 _sha256 _sha3 _sha512 _signal
    _sitebuiltins _socket _sqlite3 _sre _ssl _stat _statistics _string _strptime _struct
    _symtable _thread _threading_local _tkinter _tokenize _tracemalloc _typing _uuid
    _warnings _weakref _weakrefset _winapi _zoneinfo abc aifc antigravity argparse array
    ast asynchat asyncio asyncore atexit audioop base64 bdb binascii bisect builtins bz2
    cProfile calendar cgi cgitb chunk cmath cmd code codecs codeop collections colorsys
    compileall concurrent configparser contextlib contextvars copy copyreg crypt csv
    ctypes curses dataclasses datetime dbm decimal difflib dis distutils doctest email
    encodings ensurepip enum errno faulthandler fcntl filecmp fileinput fnmatch
    fractions ftplib functools gc genericpath getopt getpass gettext glob graphlib grp
    gzip hashlib heapq hmac html http idlelib imaplib imghdr imp importlib inspect io
    ipaddress itertools json keyword lib2to3 linecache locale logging lzma mailbox
    mailcap marshal math mimetypes mmap modulefinder msilib msvcrt multiprocessing netrc
    nis nntplib nt ntpath nturl2path numbers opcode operator optparse os ossaudiodev
    pathlib pdb pickle pickletools pipes pkgutil platform plistlib poplib posix
    posixpath pprint profile pstats pty pwd py_compile pyclbr pydoc pydoc_data pyexpat
    queue quopri random re readline reprlib resource rlcompleter runpy sched secrets
    select selectors shelve shlex shutil signal site smtpd smtplib sndhdr socket
    socketserver spwd sqlite3 sre_compile sre_constants sre_parse ssl stat statistics
    string stringprep struct subprocess sunau symtable sys sysconfig syslog tabnanny
    tarfile telnetlib tempfile termios textwrap this threading time timeit tkinter token
    tokenize tomllib trace traceback tracemalloc tty turtle turtledemo types typing
    unicodedata unittest urllib uu uuid venv warnings wave weakref webbrowser winreg
    winsound wsgiref xdrlib xml xmlrpc zipapp zipfile zipimport zlib zoneinfo
    """.split()
)

# version -> (added relative to 3.11, removed relative to 3.11)
_CHANGES: dict[str, tuple[str, str]] = {
    "3.10": (
        "binhex",
        """
        _tokenize _typing tomllib
        """,
    ),
    "3.12": (
        "_pydatetime _pylong _sha2",
        """
        _bootsubprocess _sha256 _sha512 asynchat asyncore distutils imp smtpd
        """,
    ),
    "3.13": (
        "_android_support _colorize _interpchannels _interpqueues _interpreters"
        " _ios_support _opcode_metadata _pydatetime _pylong _pyrepl _sha2"
        " _suggestions _sysconfig _wmi",
        """
        _bootsubprocess _crypt _msi _sha256 _sha512 aifc asynchat asyncore
        audioop cgi cgitb chunk crypt distutils imghdr imp lib2to3 mailcap
        msilib nis nntplib ossaudiodev pipes smtpd sndhdr spwd sunau telnetlib
        uu xdrlib
        """,
    ),
    "3.11": ("", ""),
}


def stdlib_modules(python_version: str | None = None) -> tuple[frozenset[str], str]:
    """Return ``(top-level stdlib names, version the names are for)``.

    ``python_version`` is ``"3.12"`` or ``"3.12.4"``; ``None`` means the running
    interpreter. A version newer than the table uses the newest known list and
    says so in the returned version text (``"3.13 (closest known to 3.14)"``);
    an older one than 3.10 is refused, since its stdlib is too different.
    """
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python_version is None:
        minor = running
    else:
        parts = str(python_version).strip().split(".")
        if len(parts) < 2 or not all(part.isdigit() for part in parts[:2]):
            raise ValueError(
                f"python_version {python_version!r} is not a version like '3.12' or '3.12.4'"
            )
        minor = f"{int(parts[0])}.{int(parts[1])}"
    if minor == running:
        return frozenset(sys.stdlib_module_names), minor
    if minor in _CHANGES:
        return _apply_changes(minor), minor
    newest = max(_CHANGES, key=_version_key)
    if _version_key(minor) > _version_key(newest):
        return _apply_changes(newest), f"{newest} (closest known to {minor})"
    raise ValueError(
        f"no standard-library table for Python {minor}: the table covers "
        f"{', '.join(sorted(_CHANGES, key=_version_key))}; use a snapshot of a newer Python"
    )


def _apply_changes(minor: str) -> frozenset[str]:
    added, removed = _CHANGES[minor]
    return (_PYTHON_311 | frozenset(added.split())) - frozenset(removed.split())


def _version_key(minor: str) -> tuple[int, int]:
    major, _, rest = minor.partition(".")
    return int(major), int(rest)
