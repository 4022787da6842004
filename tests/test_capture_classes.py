"""Classes and their instances travel as source and state: dumped here, loaded and used in a
fresh interpreter that cannot import the user's module."""
import pytest

import capture
from capture_support.harness import CaseList, UserCode, ship_and_load

USER_MODULES = ["myclasses"]
cases = CaseList()


@cases.case(build=lambda user: user.myclasses.Rectangle)
def check_class_with_user_base_and_super(obj, expected):
    assert obj.__name__ == "Rectangle"
    assert obj.__mro__[1].__name__ == "Shape"
    assert obj(2, 3).describe() == "Rectangle with 4 sides, area 6"
    assert obj.__module__ == "myclasses"


def build_instances(user):
    door = user.myclasses.Rectangle(2, 3)
    door.label = "door"
    return door, user.myclasses.Rectangle(4, 4)


@cases.case(build=build_instances)
def check_instances_keep_their_dict(obj, expected):
    door, tile = obj
    assert type(door) is type(tile)
    assert vars(door) == {"width": 2, "height": 3, "label": "door"}
    assert door.area() == 6
    assert tile.is_square


@cases.case(build=lambda user: user.myclasses.Rectangle)
def check_property_classmethod_staticmethod(obj, expected):
    assert isinstance(obj.__dict__["square"], classmethod)
    assert isinstance(obj.__dict__["unit"], staticmethod)
    assert isinstance(obj.__dict__["is_square"], property)
    assert obj.square(3).is_square
    assert obj.unit().area() == 1


@cases.case(build=lambda user: user.myclasses.Temperature(100))
def check_property_with_setter(obj, expected):
    assert obj.fahrenheit == 212
    obj.fahrenheit = 32
    assert obj._celsius == 0


@cases.case(build=lambda user: user.myclasses.Point(3, -4))
def check_slots_instance(obj, expected):
    assert type(obj).__slots__ == ("x", "y")
    assert not hasattr(obj, "__dict__")
    assert (obj.x, obj.y, obj.manhattan()) == (3, -4, 7)


@cases.case(build=lambda user: (user.myclasses.Outer.Inner(5), user.myclasses.Outer))
def check_nested_class(obj, expected):
    inner, outer = obj
    assert type(inner).__qualname__ == "Outer.Inner"
    assert type(inner) is outer.Inner
    assert inner.twice() == 10
    assert outer().make(2).twice() == 4


@cases.case(build=lambda user: user.myclasses.TrainConfig(lr=0.1, layers=[8]))
def check_dataclass(obj, expected):
    import dataclasses

    cls = type(obj)
    assert dataclasses.is_dataclass(obj)
    assert obj == cls(lr=0.1, layers=[8])
    assert [f.name for f in dataclasses.fields(obj)] == ["lr", "layers", "name"]
    assert cls().layers == [64, 64]  # the default factory (a lambda) travelled
    assert dataclasses.replace(obj, name="other").name == "other"
    assert obj.total_units() == 8


@cases.case(build=lambda user: user.myclasses.FrozenPoint(1, 2))
def check_frozen_dataclass(obj, expected):
    import dataclasses

    assert (obj.x, obj.y) == (1, 2)
    assert hash(obj) == hash(type(obj)(1, 2))
    try:
        obj.x = 5
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("a frozen dataclass instance became mutable")


@cases.case(build=lambda user: (user.myclasses.Color.GREEN, user.myclasses.Color.GREEN, user.myclasses.Color))
def check_enum_members_stay_singletons(obj, expected):
    import enum

    green, green_again, color = obj
    assert isinstance(color, enum.EnumMeta)
    assert green is green_again is color.GREEN
    assert color(1) is color.RED
    assert [member.name for member in color] == ["RED", "GREEN"]
    assert green.label() == "green"


@cases.case(build=lambda user: user.myclasses.Span(3))
def check_typing_named_tuple(obj, expected):
    assert obj == (3, 10)
    assert obj._fields == ("start", "end")
    assert type(obj)._field_defaults == {"end": 10}
    assert obj.length() == 7
    assert obj._replace(end=5).length() == 2


@cases.case(build=lambda user: user.myclasses.Pair(1, "b"))
def check_collections_namedtuple(obj, expected):
    assert type(obj).__name__ == "Pair"
    assert (obj.left, obj.right) == (1, "b")
    assert obj._fields == ("left", "right")


def build_mutated_registry(user):
    registry = user.myclasses.Registry
    registry.entries.append("plugin-a")
    registry.version = 2
    registry.added_later = True
    return registry


@cases.case(build=build_mutated_registry)
def check_class_attributes_mutated_after_definition(obj, expected):
    assert obj.entries == ["builtin", "plugin-a"]
    assert obj.version == 2
    assert obj.added_later is True


@cases.case(build=lambda user: user.myclasses.Snapshot([1, 2, 3]))
def check_getstate_setstate(obj, expected):
    assert obj.values == [1, 2, 3]
    assert obj.restored is True
    assert obj._total == 6


@cases.case(build=lambda user: user.myclasses.Interval(1, 5))
def check_custom_reduce(obj, expected):
    assert type(obj).__name__ == "Interval"
    assert (obj.low, obj.high) == (1, 5)
    assert obj.built_by == "make_interval"


@cases.case(build=lambda user: (user.myclasses.Plugin, user.myclasses.Plugin()))
def check_user_metaclass(obj, expected):
    plugin_class, plugin = obj
    assert type(plugin_class).__name__ == "PluginMeta"
    assert plugin_class.describe() == "plugin:plugin"
    assert isinstance(plugin, plugin_class)
    assert plugin.run() == "plugin"

    class Extra(plugin_class):  # the rebuilt metaclass still runs for new subclasses
        pass

    assert Extra.plugin_name == "extra"


@cases.case(build=lambda user: (user.myclasses.Layer, user.myclasses.DenseLayer))
def check_init_subclass(obj, expected):
    layer, dense = obj
    assert dense.kind == "dense"
    assert layer.kinds == ["dense"]  # as it was when dumped: not re-registered on load

    class Conv(layer, kind="conv"):
        pass

    assert Conv.kind == "conv"
    assert layer.kinds == ["dense", "conv"]


@cases.case(build=lambda user: user.myclasses.make_scaled_class(3))
def check_class_defined_inside_a_function(obj, expected):
    assert obj.__qualname__ == "make_scaled_class.<locals>.Scaled"
    assert obj().apply(2) == 6


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with UserCode(tmp_path_factory.mktemp("user"), USER_MODULES) as user:
        return ship_and_load(cases, user, tmp_path_factory.mktemp("load"))


@pytest.mark.parametrize("name", cases.names)
def test_class_travels(loaded, name):
    loaded.result(name)


def test_capturing_an_instance_does_not_run_its_properties(tmp_path):
    with UserCode(tmp_path, USER_MODULES) as user:
        sneaky_class = user.myclasses.Sneaky
        capture.dumps(sneaky_class())
        capture.dumps(sneaky_class)
        assert sneaky_class.reads == 0
