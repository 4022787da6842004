"""docs/FORMAT.md and capture/format.py describe the same format: every node tag and
header key in the code has a row in the document's tables, and every row names one."""
import re
from pathlib import Path

from capture import format as fmt

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def table_names(heading: str) -> set[str]:
    """The backquoted names in the first column of the table under ``heading``."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    rows = re.match(r"(?:[^|]*\n)*?((?:\|.*\n)+)", section).group(1).splitlines()[2:]  # past header and rule
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_every_node_tag_is_documented_and_every_documented_tag_exists():
    documented = table_names("### Nodes")
    assert not fmt.TAGS - documented, f"capture/format.py tags missing from docs/FORMAT.md, Nodes: {sorted(fmt.TAGS - documented)}"
    assert not documented - fmt.TAGS, f"docs/FORMAT.md, Nodes, documents tags format.py lacks: {sorted(documented - fmt.TAGS)}"


def test_every_header_key_is_documented_and_every_documented_key_exists():
    documented = table_names("## The header")
    keys = set(fmt.HEADER_KEYS)
    assert not keys - documented, f"header keys missing from docs/FORMAT.md, The header: {sorted(keys - documented)}"
    assert not documented - keys, f"docs/FORMAT.md, The header, documents keys format.py lacks: {sorted(documented - keys)}"


def test_the_tensor_fields_are_documented_in_their_order():
    text = FORMAT_MD.read_text(encoding="utf-8")
    paragraph = text.split("`tensor` fields, in this order", 1)[1].split("\n\n", 1)[0]
    named = re.findall(r"`(\w+)`", re.sub(r"\([^()]*\)", "", paragraph))  # outside the explanations
    assert tuple(named) == fmt.TENSOR_FIELDS, (f"docs/FORMAT.md lists the tensor fields as {named}; "
                                               f"capture/format.py has {list(fmt.TENSOR_FIELDS)}")


def test_the_documented_version_is_the_code_s():
    assert FORMAT_MD.read_text(encoding="utf-8").startswith(f"# The bundle format, version {fmt.FORMAT_VERSION}\n")
