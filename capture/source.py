"""Source segments: finding a definition's text on the sending side, compiling it on the
receiving side with its original file name, line and column.

Finding is cached per file (``inspect.getsource`` costs ~4.5 ms cold; here a file is
parsed once); compiling is cached per segment content, so a long-lived worker compiles
a given helper once however many requests ship it.
"""
from __future__ import annotations

import __future__
import ast
import dis
import hashlib
import linecache
import os
import stat
import sys
import threading
import tokenize
import types
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, wraps
from typing import Callable, Iterator, TypeVar

from .errors import BundleError

CLOSURE_WRAPPER = "__sourcebox_closure__"
CELL_HOLDER = "__sourcebox_cells__"
_T = TypeVar("_T")
_FUTURE_FLAGS = {name: getattr(__future__, name).compiler_flag for name in __future__.all_feature_names}


@dataclass(frozen=True)
class Segment:
    """Exact source text of one definition, with where it came from.

    ``text`` is whole lines starting at ``line`` of ``file``; a lambda starts at byte
    ``col`` of its first line and ends at byte ``end_col`` of its last. ``kind`` is
    ``def``, ``class`` or ``lambda``; ``futures`` are the file's ``from __future__`` names.
    """

    file: str
    line: int
    col: int
    kind: str
    text: str
    futures: tuple[str, ...]
    end_col: int = 0  # lambdas: where the expression ends on the last line (UTF-8 bytes, as in ast)

    @property
    def digest(self) -> str:
        key = f"{self.kind}\0{self.file}\0{self.line}\0{self.col}\0{self.end_col}\0{','.join(self.futures)}\0{self.text}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]  # 128 bits: a content key, not a signature


class SourceUnavailable(Exception):
    """The definition's source cannot be found; the message says why."""


@dataclass
class _ParsedFile:
    lines: list[str]
    tree: ast.Module
    futures: tuple[str, ...]
    by_line: dict[int, list[ast.AST]]


#: file name -> (linecache's list of lines, its parse). linecache hands back the same
#: list while the file is unchanged, so identity tells whether the parse is current.
_files: dict[str, tuple[list[str], _ParsedFile]] = {}
_files_lock = threading.Lock()


def _parsed(filename: str, module_globals: dict | None) -> _ParsedFile:
    lines = linecache.getlines(filename, module_globals)
    if not lines:
        raise SourceUnavailable(
            f"no source text for {filename!r} (code created by exec/eval or a compiled-only module)"
        )
    with _files_lock:
        cached = _files.get(filename)
    if cached is not None and cached[0] is lines:
        return cached[1]
    text = "".join(lines)
    try:
        tree = ast.parse(text, filename)
    except SyntaxError as exc:
        raise SourceUnavailable(f"{filename} does not parse: {exc}") from None
    futures = tuple(sorted(
        alias.name for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "__future__"
        for alias in node.names
    ))
    by_line: dict[int, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            by_line.setdefault(first, []).append(node)
        elif isinstance(node, ast.Lambda):
            by_line.setdefault(node.lineno, []).append(node)
    parsed = _ParsedFile(lines, tree, futures, by_line)
    with _files_lock:
        _files[filename] = (lines, parsed)
    return parsed


def _segment(parsed: _ParsedFile, filename: str, node: ast.AST, kind: str) -> Segment:
    if kind == "lambda":
        text = "".join(parsed.lines[node.lineno - 1:node.end_lineno])
        return Segment(filename, node.lineno, node.col_offset, kind, text, parsed.futures, node.end_col_offset)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    text = "".join(parsed.lines[first - 1:node.end_lineno])
    if not text.endswith("\n"):
        text += "\n"
    return Segment(filename, first, 0, kind, text, parsed.futures)


def function_segment(code: types.CodeType, module_globals: dict | None) -> Segment:
    """The segment defining the function whose code object is ``code``."""
    parsed = _parsed(code.co_filename, module_globals)
    candidates = parsed.by_line.get(code.co_firstlineno, [])
    if code.co_name == "<lambda>":
        lambdas = [n for n in candidates if isinstance(n, ast.Lambda)]
        node = _pick_lambda(lambdas, code)
        return _segment(parsed, code.co_filename, node, "lambda")
    for node in candidates:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
            return _segment(parsed, code.co_filename, node, "def")
    raise SourceUnavailable(
        f"no definition of {code.co_name!r} at {code.co_filename}:{code.co_firstlineno} "
        "(was the file edited after the code was imported?)"
    )


def _pick_lambda(nodes: list[ast.Lambda], code: types.CodeType) -> ast.Lambda:
    """Tell apart several lambdas starting on one line by where their body starts."""
    if len(nodes) == 1:
        return nodes[0]
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    same_args = [n for n in nodes if tuple(a.arg for a in n.args.args + n.args.kwonlyargs) == names]
    positions = [(line, col) for line, end_line, col, end_col in code.co_positions()
                 if None not in (line, end_line, col, end_col) and (end_line, end_col) > (line, col)]
    if positions:
        start = min(positions)
        for node in same_args or nodes:
            body = node.body
            if (body.lineno, body.col_offset) <= start <= (body.end_lineno, body.end_col_offset):
                return node
    if len(same_args) == 1:
        return same_args[0]
    raise SourceUnavailable(f"cannot tell apart the lambdas on {code.co_filename}:{code.co_firstlineno}")


def class_segment(cls: type, module_globals: dict | None, filename: str) -> Segment:
    """The segment of ``class`` statement that made ``cls``, found by its qualified name."""
    parsed = _parsed(filename, module_globals)
    matches = list(_find_qualname(parsed.tree.body, cls.__qualname__.split(".")))
    if len(matches) > 1:  # the same name defined in two branches: pick the one whose methods match
        method_lines = {
            f.__code__.co_firstlineno for f in _own_functions(cls) if f.__code__.co_filename == filename
        }
        matches = [m for m in matches if any(m.lineno <= line <= m.end_lineno for line in method_lines)] or matches
    if not matches:
        raise SourceUnavailable(f"no class statement for {cls.__qualname__!r} in {filename}")
    return _segment(parsed, filename, matches[-1], "class")


def _find_qualname(body: list[ast.stmt], parts: list[str]) -> Iterator[ast.AST]:
    head, rest = parts[0], parts[1:]
    for node in _scope_statements(body):
        if rest and rest[0] == "<locals>" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == head and len(rest) > 1:
                yield from _find_qualname(node.body, rest[1:])
        elif isinstance(node, ast.ClassDef) and node.name == head:
            if rest:
                yield from _find_qualname(node.body, rest)
            else:
                yield node


def _scope_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of one scope, looking into if/try/with/for blocks but not nested scopes."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _scope_statements([n for n in inner if isinstance(n, ast.stmt)] +
                                                 [s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])


def _own_functions(cls: type) -> Iterator[types.FunctionType]:
    for value in vars(cls).values():
        func = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        if isinstance(func, types.FunctionType):
            yield func


def _plain_function(value: object) -> types.FunctionType | None:
    """The function inside a method-like class attribute: staticmethod, classmethod,
    functools.cached_property / partial (``.func``) and wrappers (``__wrapped__``)."""
    for _ in range(8):  # wrappers of wrappers, but never a loop
        if isinstance(value, types.FunctionType):
            return value
        inner = None
        for attribute in ("__func__", "func", "__wrapped__"):
            try:
                inner = getattr(value, attribute, None)
            except Exception:  # an attribute that raises is not a wrapper's
                inner = None
            if inner is not None:
                break
        if inner is None:
            return None
        value = inner
    return None


def defined_by_class_statement(cls: type, name: str, value: object, segment: Segment) -> bool:
    """Whether ``cls.name`` is what running the class statement produces, so that it need
    not travel as a value (a method, property or nested class written in the body)."""
    if isinstance(value, property):
        return all(f is None or defined_by_class_statement(cls, name, f, segment)
                   for f in (value.fget, value.fset, value.fdel))
    if isinstance(value, type):
        return value.__qualname__ == f"{cls.__qualname__}.{name}"
    func = _plain_function(value)
    if func is None:
        return False
    code = func.__code__
    end = segment.line + segment.text.count("\n")
    return (code.co_filename == segment.file and segment.line <= code.co_firstlineno < end
            and func.__qualname__.startswith(cls.__qualname__ + "."))


# --- dependency analysis (sending side only: bytecode is read here, never shipped) ---

_NAME_OPS = {"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"}
_ATTR_OPS = {"LOAD_ATTR", "LOAD_METHOD"}


def _per_code_object(analyse: Callable[[types.CodeType], _T]) -> Callable[[types.CodeType], _T]:
    """Cache ``analyse(code)`` for as long as ``code`` is alive, and no longer.

    An ``lru_cache`` kept up to its size of code objects (each with its constants, nested
    code and names) alive in a long-lived client after their functions were gone. CPython
    code objects take weak references (3.10-3.13, tested), so the cache is keyed weakly:
    an entry leaves with its code. Keys compare like code objects (by content), which is
    sound here: the analysis reads only the content.
    """
    cache: weakref.WeakKeyDictionary[types.CodeType, _T] = weakref.WeakKeyDictionary()

    @wraps(analyse)
    def cached(code: types.CodeType) -> _T:
        try:
            return cache[code]
        except KeyError:
            result = cache[code] = analyse(code)
            return result

    return cached


@_per_code_object
def global_names(code: types.CodeType) -> dict[str, frozenset[tuple[str, ...]]]:
    """Global names ``code`` (and every code nested in it) reads or writes, each with the
    attribute chains read from it (``np.linalg.norm`` -> ``{'np': {('linalg', 'norm')}}``).
    Cached per code object: reading bytecode is most of the cost of capturing a function."""
    found: dict[str, set[tuple[str, ...]]] = {}
    for inner in _codes(code):
        chain_root, chain = None, ()
        for ins in dis.get_instructions(inner):
            if ins.opname in _NAME_OPS:
                if chain_root is not None:
                    found[chain_root].add(chain)
                chain_root, chain = ins.argval, ()
                found.setdefault(chain_root, set())
            elif ins.opname in _ATTR_OPS and chain_root is not None:
                chain += (ins.argval,)
            else:
                if chain_root is not None and chain:
                    found[chain_root].add(chain)
                chain_root, chain = None, ()
        if chain_root is not None and chain:
            found[chain_root].add(chain)
    return {name: frozenset(chains) for name, chains in found.items()}


@_per_code_object
def relative_imports(code: types.CodeType) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """``from .x import y`` statements inside ``code``: (level, module, names)."""
    found = []
    for inner in _codes(code):
        constants: list = []
        for ins in dis.get_instructions(inner):
            if ins.opname == "IMPORT_NAME" and len(constants) >= 2 and isinstance(constants[-2], int) \
                    and constants[-2] > 0:
                found.append((constants[-2], ins.argval, tuple(constants[-1] or ())))
            constants = constants[-1:] + [ins.argval] if ins.opname == "LOAD_CONST" else []
    return tuple(found)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def class_statement_code(segment: Segment) -> types.CodeType:
    """The compiled class statement, for dependency analysis of bases, decorators and body."""
    return compile_segment(segment, ())



def in_site_packages(file: str) -> bool:
    """Whether ``file`` belongs to an installed distribution (a site-packages or
    dist-packages directory), rather than to the user's own code."""
    parts = file.replace("\\", "/").split("/")
    return "site-packages" in parts or "dist-packages" in parts


# --- compiling on the receiving side ---

@lru_cache(maxsize=4096)
def compile_segment(segment: Segment, freevars: tuple[str, ...], tenant: str = "") -> types.CodeType:
    """Compile ``segment`` so that positions in tracebacks are the original ones.

    ``tenant`` only keys the cache: a receiver serving several senders shares no code
    object between them.

    A ``def`` is compiled without its decorators (the live function object they made
    travels instead, so the def statement itself never runs). With ``freevars``, the
    definition is wrapped in ``def __sourcebox_closure__(<freevars>):`` so its free
    variables compile as closure cells, not globals.
    """
    try:
        node = _parse_segment(segment)
    except SyntaxError as exc:
        here = ".".join(map(str, sys.version_info[:3]))
        text = f" ({exc.text.strip()[:200]!r})" if exc.text else ""
        raise BundleError(
            f"source from {segment.file}:{exc.lineno or segment.line}{text} does not compile on this "
            f"Python {here}: {exc.msg}. The bundle was made on a Python that accepts newer syntax: "
            f"write this for Python {sys.version_info[0]}.{sys.version_info[1]}, or run the receiver on "
            "the sender's Python version"
        ) from None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.decorator_list = []
    statement = ast.copy_location(ast.Expr(node), node) if isinstance(node, ast.Lambda) else node
    if freevars and isinstance(node, ast.ClassDef):
        # def __sourcebox_cells__():  <freevars> = None
        #     def __sourcebox_closure__(): <class statement>; return <class>
        # The inner function's free variables are the class's: the receiver builds it
        # over the shipped cells, so the class shares them with other closures.
        inner = _function_def(CLOSURE_WRAPPER, (), [statement, ast.Return(ast.Name(node.name, ast.Load()))], node)
        assign = ast.Assign(targets=[ast.Name(v, ast.Store()) for v in freevars], value=ast.Constant(None))
        statement = _function_def(CELL_HOLDER, (), [assign, inner], node)
    elif freevars:
        statement = _function_def(CLOSURE_WRAPPER, freevars, [statement, ast.Pass()], node)
    module = ast.Module(body=[statement], type_ignores=[])
    flags = 0
    for name in segment.futures:
        flags |= _FUTURE_FLAGS.get(name, 0)
    return compile(module, segment.file, "exec", flags=flags, dont_inherit=True)


def _function_def(name: str, parameters: tuple[str, ...], body: list[ast.stmt], at: ast.AST) -> ast.FunctionDef:
    """A synthetic ``def`` placed at ``at``'s position (it adds no lines of its own)."""
    function = ast.FunctionDef(
        name=name, args=ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in parameters], kwonlyargs=[],
                                      kw_defaults=[], defaults=[]),
        body=body, decorator_list=[], returns=None, type_params=[],
    )
    for part in [function, *body]:
        if not hasattr(part, "lineno"):
            ast.copy_location(part, at)
    return ast.fix_missing_locations(function)


def class_closure_code(module_code: types.CodeType) -> types.CodeType:
    """The code of the function that runs a class statement over shipped cells."""
    holder = next(c for c in module_code.co_consts if isinstance(c, types.CodeType))
    return next(c for c in holder.co_consts if isinstance(c, types.CodeType) and c.co_name == CLOSURE_WRAPPER)


def _parse_segment(segment: Segment) -> ast.AST:
    text, line = segment.text, segment.line
    if segment.kind == "lambda":
        lines = [l.encode() for l in text.splitlines(keepends=True)] or [b""]
        lines[-1] = lines[-1][:segment.end_col]
        lines[0] = lines[0][segment.col:]
        column = len(text.encode()[:segment.col].decode(errors="replace"))
        expression = b"".join(lines).decode()
        padded = "\n" * (line - 1) + "(" + " " * max(column - 1, 0) + expression + "\n)"
        return ast.parse(padded, segment.file).body[0].value
    if text[:1] in (" ", "\t") and line >= 2:
        # An indented definition (a method, a nested def) keeps its columns under `if 1:`.
        return ast.parse("\n" * (line - 2) + "if 1:\n" + text, segment.file).body[0].body[0]
    return ast.parse("\n" * (line - 1) + text, segment.file).body[0]


def code_of(module_code: types.CodeType, segment: Segment, freevars: tuple[str, ...]) -> types.CodeType:
    """The function's own code object inside a compiled segment."""
    holder = module_code
    if freevars:
        holder = next(c for c in module_code.co_consts if isinstance(c, types.CodeType))
    # Lambdas in default values compile first; the definition's own code comes last.
    for const in reversed(holder.co_consts):
        if isinstance(const, types.CodeType):
            return const
    raise BundleError(f"segment at {segment.file}:{segment.line} holds no function")


# --- linecache on the receiving side ---

#: Bounds on what a long-lived receiver keeps for tracebacks: the files most recently
#: shipped, and their lines in all. The oldest file goes first.
MAX_SHIPPED_FILES = 256
MAX_SHIPPED_LINES = 100_000


class ShippedLines(Sequence):
    """A shipped file's lines as linecache hands them out: the segments at their real
    line numbers, blank lines everywhere else. Sparse, so a segment that claims line
    999,990 costs its own lines, not a million blank ones."""

    def __init__(self) -> None:
        self.lines: dict[int, str] = {}  # 0-based line number -> text with its newline
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):  # inspect reads a definition as lines[start:]
            return [self.lines.get(i, "\n") for i in range(*index.indices(self.length))]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError("line number out of range")
        return self.lines.get(index, "\n")

    def add(self, start: int, lines: list[str]) -> None:
        for offset, line in enumerate(lines):
            self.lines[start + offset] = line if line.endswith("\n") else line + "\n"
        self.length = max(self.length, start + len(lines))


#: file name -> its shipped lines, least recently registered first.
_shipped: "OrderedDict[str, ShippedLines]" = OrderedDict()
_shipped_lock = threading.Lock()
#: Segments registered since lines were last dropped: a repeat load registers nothing
#: (and reads no file) again. Emptied whenever any lines are dropped, and when it is full.
_registered: set[Segment] = set()
_MAX_REGISTERED = 4096


def register_lines(segment: Segment) -> None:
    """Make tracebacks and ``inspect.getsource`` show shipped code at its real position.

    Where the file is not readable here (the usual case on a worker), linecache gets a
    sparse copy: the shipped segments at their lines, blank lines elsewhere. At most
    ``MAX_SHIPPED_FILES`` files and ``MAX_SHIPPED_LINES`` lines are kept; the file
    registered longest ago is dropped first, and ``release_lines`` drops them all.
    """
    if segment in _registered:
        return
    seg_lines = segment.text.splitlines(keepends=True)
    start = segment.line - 1
    with _shipped_lock:
        registered = segment.file in _shipped
    if not registered and _real_file_holds(segment.file, start, seg_lines):
        _remember_registered(segment)
        return
    with _shipped_lock:
        lines = _shipped.pop(segment.file, None) or ShippedLines()
        lines.add(start, seg_lines)
        _shipped[segment.file] = lines
        linecache.cache[segment.file] = (len(lines), None, lines, segment.file)
        total = sum(len(entry.lines) for entry in _shipped.values())
        while len(_shipped) > MAX_SHIPPED_FILES or (total > MAX_SHIPPED_LINES and len(_shipped) > 1):
            file, dropped = _shipped.popitem(last=False)
            total -= len(dropped.lines)
            _forget(file, dropped)
    _remember_registered(segment)


def _remember_registered(segment: Segment) -> None:
    with _shipped_lock:
        if len(_registered) >= _MAX_REGISTERED:
            _registered.clear()
        _registered.add(segment)


def release_lines() -> int:
    """Drop every shipped file's lines from linecache (a worker calls this when a
    request ends, so what a request shipped does not outlive it); returns how many
    files were dropped. Code still alive shows no source lines in later tracebacks
    until its file is shipped again."""
    with _shipped_lock:
        _registered.clear()
        dropped = list(_shipped.items())
        _shipped.clear()
        for file, lines in dropped:
            _forget(file, lines)
    return len(dropped)


def _forget(file: str, lines: ShippedLines) -> None:
    _registered.clear()  # (under _shipped_lock) segments of that file must register again
    entry = linecache.cache.get(file)
    if entry is not None and len(entry) > 2 and entry[2] is lines:
        del linecache.cache[file]


#: Largest real file consulted to see whether it already holds a shipped segment.
_MAX_REAL_FILE = 8 * 2**20


def _real_file_holds(file: str, start: int, seg_lines: list[str]) -> bool:
    """Whether ``file`` here (a regular file, not too big: a bundle names any path it
    likes) already has the segment at its line, so linecache may read the real one."""
    try:
        info = os.stat(file)
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_REAL_FILE:
        return False
    if file in linecache.cache:
        return linecache.getlines(file)[start:start + len(seg_lines)] == seg_lines
    try:  # read here rather than through linecache, which would keep every file a bundle names
        with tokenize.open(file) as handle:
            lines = handle.readlines()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    return lines[start:start + len(seg_lines)] == seg_lines
