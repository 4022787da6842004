"""``python -m capture inspect FILE``: what a bundle holds, without running any of it."""
from __future__ import annotations

import argparse
import collections
import sys

from . import format as fmt
from .errors import BundleError


def describe(data: bytes) -> str:
    header, start = fmt.unpack_header(data)
    lines = [
        f"{fmt.FORMAT_NAME} v{header['version']}: made by Python {header['python']} for policy {header['policy']!r}",
        f"size: {len(data)} bytes (header {min(start, len(data))} incl. padding, frames {max(len(data) - start, 0)})",
    ]
    sources = header["sources"]
    lines.append(f"modules ({len(header['modules'])}):")
    for record in header["modules"]:
        names = ", ".join(sorted(record["globals"])) or "-"
        lines.append(f"  {record['name']}  ({record['file'] or 'no file'})  globals: {names}")
    lines.append(f"definitions ({len(sources)} source segments):")
    for s in sources:
        text = s.get("text")
        if text is None:
            lines.append(f"  {s.get('file')}:{s.get('line')}  {s.get('kind')!s:6} sent by digest {s.get('digest')}")
            continue
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        lines.append(f"  {s.get('file')}:{s.get('line')}  {s.get('kind')!s:6} {len(text)} chars  {first[:60]}")
    tags = collections.Counter(node[0] for node in header["nodes"] if isinstance(node, list) and node)
    lines.append(f"values ({len(header['nodes'])} nodes): " + ", ".join(f"{t} {n}" for t, n in sorted(tags.items())))
    lines.append(f"frames ({len(header['frames'])}):")
    described = {}
    for node in header["nodes"]:
        if node[0] == fmt.TENSOR:
            meta = dict(zip(fmt.TENSOR_FIELDS, node[1]))
            described.setdefault(meta["storage"], f"tensor {meta['dtype']} {meta['shape']} on {meta['device']}")
        elif node[0] == fmt.NDARRAY:
            described.setdefault(node[1], f"ndarray {node[2]} {node[3]}")
        elif node[0] == fmt.BYTES_FRAME:
            described.setdefault(node[1], "bytes")
    for number, (offset, length) in enumerate(header["frames"]):
        lines.append(f"  #{number} at +{offset}: {length} bytes  {described.get(number, '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capture", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="describe a bundle file without executing it")
    inspect.add_argument("file")
    args = parser.parse_args(argv)
    try:
        with open(args.file, "rb") as f:
            data = f.read()
        try:
            text = describe(data)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"malformed bundle: {type(exc).__name__}: {exc}") from None
        print(text)
    except (OSError, BundleError) as exc:
        print(f"python -m capture inspect: {args.file}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
