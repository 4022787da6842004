"""Write the golden bundles of the current format version (tests/golden/cases.py).

    python scripts/make_goldens.py

Run it when the format version changes (bump capture/format.py's FORMAT_VERSION first),
or when a case is added; commit tests/golden/v<version>/. Goldens of older versions stay:
they show what this reader does with them (tests/test_golden_bundles.py).
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import capture
from capture import format as fmt
from golden.cases import CASES, persistent_id


def main() -> int:
    folder = REPO / "tests" / "golden" / f"v{fmt.FORMAT_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (build, _) in CASES.items():
        data = capture.encode(build(), persistent_id=persistent_id).to_bytes()
        (folder / f"{name}.bundle").write_bytes(data)
        print(f"{folder.relative_to(REPO)}/{name}.bundle: {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
