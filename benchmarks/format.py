"""Human-readable numbers for the report and the terminal."""
from __future__ import annotations


def bytes_text(count: int | float | None) -> str:
    if count is None:
        return "n/a"
    size, exponent = float(count), 0
    while abs(size) >= 1024 and exponent < 3:
        size /= 1024
        exponent += 1
    return f"{int(size):,} B" if exponent == 0 else f"{size:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def time_text(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    # Near 1, show enough digits that a small excess is not printed as exactly 1.
    if ratio != 1.0 and abs(ratio - 1.0) < 0.001:
        return f"{ratio:.5f}x"
    return f"{ratio:.3f}x" if abs(ratio - 1.0) < 0.01 else f"{ratio:.2f}x"


def stats_text(stats: dict | None) -> str:
    """``median (min-max)`` of a timing summary."""
    if not stats:
        return "n/a"
    return f"{time_text(stats['median'])} ({time_text(stats['min'])}-{time_text(stats['max'])})"


def ratio_stats_text(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"{ratio_text(stats['median'])} ({ratio_text(stats['min'])}-{ratio_text(stats['max'])})"
