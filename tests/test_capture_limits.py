"""Receiving code under hostile bundles (issue 11): only BundleError, bounded memory for
source lines, and no allocation or work by a size the bundle merely declares."""
import collections
import gc
import linecache
import struct
import traceback

import msgpack
import pytest

import capture
from capture import format as fmt
from capture import source as capture_source

pytestmark = pytest.mark.timeout(120)


def ref(index):
    return msgpack.ExtType(fmt.EXT_REF, struct.pack(">I", index))


NESTED = "__nested_1020_deep__"


def bundle(nodes, root=0, sources=(), modules=(), frame_data=(), **fields):
    """A header written by hand; the string NESTED stands for an array nested 1020 deep
    (deeper than msgpack's packer or Python's repr go, within what msgpack reads)."""
    header = {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "python": "3", "policy": "x",
              "root": ref(root), "nodes": list(nodes), "sources": list(sources), "modules": list(modules),
              "frames": [], **fields}
    packed = msgpack.packb(header, use_bin_type=True).replace(msgpack.packb(NESTED), b"\x91" * 1020 + b"\xc0")
    return fmt.join(packed, [memoryview(f) for f in frame_data])


# --- only BundleError -------------------------------------------------------------------

@pytest.mark.parametrize("field", ["version", "frames"])
def test_a_deeply_nested_header_field_is_refused_by_name(field):
    """``repr`` of a 1020-deep value in the error message used to overflow the stack."""
    value = NESTED if field == "version" else [NESTED]
    data = bundle([["list", []]], **{field: value})
    with pytest.raises(capture.BundleError, match=field.rstrip("s")) as caught:
        capture.loads(data)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("node", [[["list"], []], [{"a": 1}, []], ["ref", ["builtins"], "range"]],
                         ids=["list-tag", "map-tag", "list-module"])
def test_an_unhashable_tag_or_name_is_refused_when_read_as_data(node):
    """The data-only decoder looked tags and names up in sets before checking their type."""
    reducer = ["reduce", ref(0), None, None, None, None]
    for policy in (capture.DATA_ONLY, capture.DEFAULT):
        with pytest.raises(capture.BundleError, match="node|malformed|refused"):
            capture.loads(bundle([node, reducer], root=1 if node[0] == "ref" else 0), policy=policy)


class Shipped:
    """A class with an attribute added after its statement ran, so it travels in attrs."""


Shipped.added = 1


def class_bundle_with_attrs(attrs):
    """A real class bundle whose class node's attrs are replaced."""
    header, frames = capture.encode(Shipped).header, []
    tree = msgpack.unpackb(header, raw=False, strict_map_key=False)
    (node,) = [n for n in tree["nodes"] if n[0] == "class"]
    assert "added" in node[1]["attrs"]
    node[1]["attrs"] = {k: (v if k != "__placeholder__" else None) for k, v in attrs.items()}
    return fmt.join(msgpack.packb(tree, use_bin_type=True), frames)


@pytest.mark.parametrize("attrs", [{1: 2}, {None: 1}, {"__name__": 5}, {"__dict__": 1}, {"__bases__": 1},
                                   {"__class__": 1}, {"__init_subclass__": 1}],
                         ids=["int-key", "nil-key", "__name__", "__dict__", "__bases__", "__class__", "hook"])
def test_class_attributes_with_odd_names_are_refused(attrs):
    with pytest.raises(capture.BundleError, match="attribute"):
        capture.loads(class_bundle_with_attrs(attrs))


def test_a_plain_class_attribute_still_travels():
    loaded = capture.loads(capture.dumps(Shipped))
    assert loaded.added == 1 and loaded.__name__ == "Shipped"


# --- memory for source lines -----------------------------------------------------------------

def far_function_bundle(file, line, body="return 7"):
    source = {"file": file, "line": line, "kind": "def", "col": 0, "futures": [], "text": f"def far():\n    {body}\n"}
    source["digest"] = capture_source.Segment(file, line, 0, "def", source["text"], ()).digest
    module = {"name": "farmod", "file": file, "package": "", "globals": {}}
    function = {"source": 0, "module": 0, "name": "far", "qualname": "far", "doc": None, "deps": [],
                "closure": {}, "defaults": None, "kwdefaults": None, "annotations": None, "dict": None}
    return bundle([["function", function]], sources=[source], modules=[module])


def test_a_segment_claiming_a_far_line_costs_its_own_lines_only(tmp_path):
    """A segment at line 999,990 of a new file used to keep a million padded lines (and a
    linecache copy) forever: now the lines kept are the segment's, and a traceback still
    shows the right file, line and text."""
    file = str(tmp_path / "not_here" / "far.py")
    fn = capture.loads(far_function_bundle(file, 999_990))
    assert fn() == 7
    lines = linecache.getlines(file)
    assert len(lines) == 999_991 and lines[999_989] == "def far():\n" and lines[0] == "\n"
    assert isinstance(lines, capture_source.ShippedLines) and len(lines.lines) == 2
    assert linecache.getline(file, 999_991).strip() == "return 7"
    capture.release_lines()
    assert file not in linecache.cache


def test_source_lines_stay_bounded_over_many_files(tmp_path):
    before = sum(len(lines.lines) for lines in capture_source._shipped.values())
    for number in range(capture_source.MAX_SHIPPED_FILES + 40):
        capture.loads(far_function_bundle(str(tmp_path / f"gone{number}.py"), 10 + number))
    assert len(capture_source._shipped) <= capture_source.MAX_SHIPPED_FILES
    assert str(tmp_path / "gone0.py") not in linecache.cache  # the oldest went first
    assert str(tmp_path / f"gone{capture_source.MAX_SHIPPED_FILES + 39}.py") in linecache.cache
    kept = sum(len(lines.lines) for lines in capture_source._shipped.values())
    assert kept <= max(before, capture_source.MAX_SHIPPED_LINES)
    dropped = capture.release_lines()
    assert dropped >= capture_source.MAX_SHIPPED_FILES and not capture_source._shipped


def test_tracebacks_of_shipped_code_show_the_real_line_before_release(tmp_path):
    file = str(tmp_path / "elsewhere.py")
    fn = capture.loads(far_function_bundle(file, 5000, "return 1/0"))
    try:
        fn()
    except ZeroDivisionError:
        text = traceback.format_exc()
    assert f'File "{file}", line 5001, in far' in text and "return 1/0" in text
    capture.release_lines()


def test_a_special_file_named_as_source_is_not_read(tmp_path):
    """A bundle may name any path as its file: /dev/zero has no end of lines."""
    fn = capture.loads(far_function_bundle("/dev/zero", 3))
    assert fn() == 7
    assert linecache.getline("/dev/zero", 4).strip() == "return 7"
    capture.release_lines()


# --- no allocation or work by a declared size (data only) ---------------------------------

def data_only(nodes, root):
    return capture.loads(bundle(nodes, root=root), policy=capture.DATA_ONLY)


def range_node(at):
    """Nodes at ``at``..``at+2`` building range(2**62): small to send, endless to iterate."""
    return [["ref", "builtins", "range"], ["tuple", [2**62]], ["reduce", ref(at), ref(at + 1), None, None, None]]


@pytest.mark.parametrize("cls, args", [("bytes", [2**33]), ("bytearray", [2**33]), ("str", [b"x", "utf-32"]),
                                       ("int", ["1" * 100])])
def test_builtin_new_with_a_declared_size_is_refused(cls, args):
    nodes = [["ref", "builtins", cls], ["tuple", args], ["object", ref(0), ref(1), None, None, None, None]]
    with pytest.raises(capture.BundleError, match="refused"):
        data_only(nodes, 2)


@pytest.mark.parametrize("constructor", [("builtins", "tuple"), ("builtins", "frozenset")])
def test_builtin_new_over_a_range_is_refused(constructor):
    nodes = range_node(0) + [["ref", *constructor], ["tuple", [ref(2)]],
                             ["object", ref(3), ref(4), None, None, None, None]]
    with pytest.raises(capture.BundleError, match="refused"):
        data_only(nodes, 5)


@pytest.mark.parametrize("constructor", [("collections", "deque"), ("collections", "Counter"), ("torch", "Size"),
                                         ("types", "SimpleNamespace")])
def test_a_constructor_is_not_handed_a_range_to_iterate(constructor):
    if constructor[0] == "torch":
        pytest.importorskip("torch")
    nodes = range_node(0) + [["ref", *constructor], ["tuple", [ref(2)]], ["reduce", ref(3), ref(4), None, None, None]]
    with pytest.raises(capture.BundleError, match="iterate"):
        data_only(nodes, 5)


@pytest.mark.parametrize("policy", [capture.DATA_ONLY, capture.DEFAULT], ids=["data-only", "default"])
def test_list_items_that_are_a_range_are_refused(policy):
    nodes = range_node(0) + [["ref", "builtins", "list"], ["object", ref(3), None, None, None, ref(2), None]]
    with pytest.raises(capture.BundleError, match="list items"):
        capture.loads(bundle(nodes, root=4), policy=policy)


def test_a_fraction_from_an_exponent_string_is_refused():
    import fractions  # noqa: F401 - a data-only decode names only what is loaded
    nodes = [["ref", "fractions", "Fraction"], ["tuple", ["1e999999999"]], ["reduce", ref(0), ref(1), None, None, None]]
    with pytest.raises(capture.BundleError, match="integers"):
        data_only(nodes, 2)


def test_an_empty_tensor_object_cannot_be_resized_by_its_state():
    torch = pytest.importorskip("torch")
    nodes = [["ref", "torch", "Tensor"], ["object", ref(0), None, None, None, None, None]]
    with pytest.raises(capture.BundleError, match="tensor"):
        data_only(nodes, 1)
    assert torch.nn.Parameter  # the real tensors still travel: see test_results_data_only


def test_values_of_every_kind_still_load_as_data():
    torch = pytest.importorskip("torch")
    import datetime
    import fractions
    values = {"deque": collections.deque([1, 2], maxlen=4), "counter": collections.Counter("aab"),
              "size": torch.Size([2, 3]), "fraction": fractions.Fraction(3, 7), "range": range(0, 10, 2),
              "when": datetime.datetime(2024, 2, 29, tzinfo=datetime.timezone.utc),
              "default": collections.defaultdict(list, k=[1]), "max": torch.max(torch.ones(2, 2), 0)}
    loaded = capture.loads(capture.dumps(values), policy=capture.DATA_ONLY)
    assert {k: v for k, v in loaded.items() if k != "max"} == {k: v for k, v in values.items() if k != "max"}
    assert loaded["max"].values.tolist() == [1.0, 1.0]
    gc.collect()
