"""Tensors, nn.Modules, datasets and torch server objects: dumped here, loaded in one fresh
interpreter (one ``import torch`` for all cases) that cannot import the user's module."""
import struct

import pytest

torch = pytest.importorskip("torch", reason="the torch cases need the worker extra (setup.cfg [worker])")

import capture  # noqa: E402 - after the torch skip
from capture_support.child_main import describe  # noqa: E402
from capture_support.harness import CaseList, UserCode, header_problems, ship_and_load  # noqa: E402

USER_MODULES = ["mytorch"]
cases = CaseList()


def check_same_description(obj, expected):
    return describe(obj)


def tensors_of_every_dtype():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 3
    return {
        "float32": base, "float16": base.half(), "bfloat16": base.bfloat16(), "float64": base.double(),
        "int64": torch.arange(-3, 3), "int32": torch.tensor([1, -2], dtype=torch.int32),
        "int8": torch.tensor([-128, 127], dtype=torch.int8), "uint8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "complex64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }


def shared_tensor():
    tensor = torch.arange(4.0)
    return [tensor, tensor]


DESCRIBED = {
    "tensors_of_every_dtype": tensors_of_every_dtype,
    "transposed_tensor_keeps_its_strides": lambda: torch.arange(12.0).reshape(3, 4).t(),
    "requires_grad_and_parameters": lambda: [torch.ones(3, requires_grad=True), torch.nn.Parameter(torch.zeros(2))],
    "same_tensor_twice_stays_one_tensor": shared_tensor,
}
for case_name, make in DESCRIBED.items():
    cases.case(build=lambda user, make=make: make(), expect=describe, name=case_name)(check_same_description)


def values_dtype_shape(tensor):
    return {"values": tensor.tolist(), "dtype": str(tensor.dtype), "shape": list(tensor.shape)}


@cases.case(build=lambda user: torch.arange(20.0).reshape(4, 5)[1:, ::2], expect=values_dtype_shape)
def check_strided_slice(obj, expected):
    return {"values": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}


@cases.case(build=lambda user: torch.arange(1000.0).reshape(10, 100)[7], expect=values_dtype_shape)
def check_small_contiguous_view_deep_into_its_storage(obj, expected):
    # Shipped alone, it travels compacted: its own elements, not the storage's first ones.
    assert obj.untyped_storage().nbytes() == 100 * 4
    return {"values": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}


def base_and_view():
    base = torch.arange(10.0)
    return base, base[2:5]


@cases.case(build=lambda user: base_and_view())
def check_views_share_storage(obj, expected):
    base, view = obj
    assert view.tolist() == [2.0, 3.0, 4.0]
    view[0] = 100.0
    assert base[2].item() == 100.0, "the view and its base no longer share storage"


@cases.case(build=lambda user: torch.ones(3, requires_grad=True))
def check_loaded_leaf_tensor_accumulates_gradients(obj, expected):
    (obj * 2).sum().backward()
    assert obj.grad.tolist() == [2.0, 2.0, 2.0]


PROBE_INPUT = [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -3.0, 0.0]]


def trained_probe(user):
    torch.manual_seed(0)
    probe = user.mytorch.Probe(4, 3)
    with torch.no_grad():
        probe.running_mean += 0.5
        probe.scale.mul_(2.0)
    return probe.eval()


def probe_state_and_output(probe):
    return {
        "state": {name: tensor.tolist() for name, tensor in probe.state_dict().items()},
        "output": probe(torch.tensor(PROBE_INPUT)).tolist(),
    }


@cases.case(build=trained_probe, expect=probe_state_and_output)
def check_module_with_parameters_buffers_and_submodules(obj, expected):
    import torch

    assert isinstance(obj, torch.nn.Module) and type(obj).__name__ == "Probe"
    assert type(obj.proj) is torch.nn.Linear
    assert obj.training is False
    assert isinstance(obj.scale, torch.nn.Parameter) and obj.scale.requires_grad
    assert [name for name, _ in obj.named_buffers()] == ["running_mean"]
    state = obj.state_dict()
    assert list(state) == list(expected["state"])
    for name, values in expected["state"].items():
        assert state[name].tolist() == values, name
    output = obj(torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -3.0, 0.0]]))
    assert torch.allclose(output, torch.tensor(expected["output"]))


def tied_model(user):
    torch.manual_seed(1)
    return user.mytorch.TiedLM()


@cases.case(build=tied_model, expect=lambda model: model(torch.tensor([1, 4, 9])).tolist())
def check_shared_submodule_and_tied_weights(obj, expected):
    import torch

    assert obj.alias is obj.body
    assert obj.unembed.weight is obj.embed.weight
    assert len(list(obj.parameters())) == 3  # embedding (tied), body weight and bias
    assert torch.allclose(obj(torch.tensor([1, 4, 9])), torch.tensor(expected))


@cases.case(build=lambda user: user.mytorch.Probe)
def check_module_class(obj, expected):
    import torch

    assert issubclass(obj, torch.nn.Module)
    probe = obj(2, 5)
    assert probe(torch.zeros(1, 2)).shape == (1, 5)


@cases.case(build=lambda user: user.mytorch.WindowDataset(torch.arange(6.0), 3))
def check_dataset_subclass(obj, expected):
    from torch.utils.data import DataLoader, Dataset

    assert isinstance(obj, Dataset)
    assert len(obj) == 4
    assert obj[1].tolist() == [1.0, 2.0, 3.0]
    assert next(iter(DataLoader(obj, batch_size=2))).shape == (2, 3)


@cases.case(build=lambda user: user.mytorch.leaky)
def check_function_calling_torch_functional(obj, expected):
    import torch

    assert torch.allclose(obj(torch.tensor([-1.0, 2.0])), torch.tensor([-0.1, 2.0]))


def torch_server_objects(user):
    return [
        torch.nn.functional.relu, torch.float16, torch.bfloat16, torch.nn.Linear, torch.nn.functional,
        torch.device("cpu"), torch.Size([2, 3]),
    ]


@cases.case(build=torch_server_objects)
def check_torch_objects_travel_by_reference(obj, expected):
    import torch

    relu, float16, bfloat16, linear, functional, device, size = obj
    assert relu is torch.nn.functional.relu
    assert float16 is torch.float16 and bfloat16 is torch.bfloat16
    assert linear is torch.nn.Linear
    assert functional is torch.nn.functional
    assert device == torch.device("cpu")
    assert size == torch.Size([2, 3]) and type(size) is torch.Size


LARGE = 1 << 20  # elements: a 4 MiB float32 tensor


@cases.case(build=lambda user: torch.arange(LARGE, dtype=torch.float32))
def check_large_tensor(obj, expected):
    import torch

    assert obj.shape == (1 << 20,) and obj.dtype == torch.float32
    assert torch.equal(obj, torch.arange(1 << 20, dtype=torch.float32))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with UserCode(tmp_path_factory.mktemp("user"), USER_MODULES) as user:
        return ship_and_load(cases, user, tmp_path_factory.mktemp("load"), preload=["torch"])


@pytest.mark.parametrize("name", cases.names)
def test_torch_object_travels(loaded, name):
    value = loaded.result(name)
    if loaded.expected(name) is not None and value is not None:
        assert value == loaded.expected(name)


def test_large_tensor_travels_as_a_frame_not_in_the_header():
    bundle = capture.encode(torch.arange(LARGE, dtype=torch.float32))
    assert len(bundle.header) < 4096
    assert [len(frame) for frame in bundle.frames] == [4 * LARGE]
    assert not header_problems(bundle.header)


def test_decode_over_writable_frames_is_zero_copy():
    bundle = capture.encode(torch.zeros(8))
    frames = [memoryview(bytearray(frame)) for frame in bundle.frames]
    tensor = capture.decode(bundle.header, frames)
    struct.pack_into("<f", frames[0], 0, 42.0)
    assert tensor[0].item() == 42.0, "the tensor does not view the frame it was decoded from"


def test_decode_over_read_only_frames_copies():
    bundle = capture.encode(torch.zeros(8))
    frames = [memoryview(bytes(frame)) for frame in bundle.frames]
    tensor = capture.decode(bundle.header, frames)
    tensor[0] = 7.0  # a view of read-only memory could not be written
    assert bytes(frames[0][:4]) == struct.pack("<f", 0.0)
    assert tensor.tolist() == [7.0] + [0.0] * 7
