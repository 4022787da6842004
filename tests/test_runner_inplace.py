"""Arguments made in transport memory (``Worker.empty``): they travel as a handle, the
worker cannot change them, and reusing them after a call changes no result (issue 15)."""
import os
import subprocess
import sys

import numpy
import pytest
import torch

import runner
from runner import shm
from runner_support import user_modules

HELPERS = '''
def total(t):
    return float(t.double().sum())

def echo(t):
    return t

def scribble(t):
    t.add_(100)   # in place, on the worker's view of the argument
    return float(t.double().sum())
'''


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    """Imported here from a directory the worker cannot see: the helpers travel as source."""
    with user_modules(tmp_path_factory.mktemp("inplace"), inplace_helpers=HELPERS) as module:
        yield module


@pytest.fixture(scope="module")
def worker():
    with runner.Worker(model="none") as worker:
        yield worker


def test_a_tensor_made_in_transport_memory_travels_without_a_copy(worker, helpers):
    tensor = worker.empty((256, 1024))  # 1 MiB of float32
    tensor.fill_(1.0)
    before = worker.stats()["bytes_in_place"]
    assert worker.call(helpers.total, tensor) == 256 * 1024
    assert worker.stats()["bytes_in_place"] - before == tensor.nbytes
    # A view of all of it travels in place too (its storage is the transport memory); a
    # slice goes as the compact copy capture makes of the part it views.
    before = worker.stats()["bytes_in_place"]
    assert worker.call(helpers.total, tensor.view(-1)) == 256 * 1024
    assert worker.stats()["bytes_in_place"] - before == tensor.nbytes
    # CONTROL: an ordinary tensor of the same size is copied into the pool.
    ordinary = torch.ones(256, 1024)
    before = worker.stats()["bytes_in_place"]
    assert worker.call(helpers.total, ordinary) == 256 * 1024
    assert worker.stats()["bytes_in_place"] == before


def test_writing_the_tensor_after_a_call_changes_no_result_already_returned(worker, helpers):
    tensor = worker.empty((1 << 20,))
    tensor.fill_(1.0)
    first = worker.call(helpers.echo, tensor)
    tensor.fill_(2.0)  # reused for the next call
    second = worker.call(helpers.echo, tensor)
    assert torch.equal(first, torch.ones(1 << 20)) and torch.equal(second, torch.full((1 << 20,), 2.0))
    # The results are memory of their own, not views of the argument.
    second.fill_(3.0)
    assert float(tensor[0]) == 2.0 and float(first[0]) == 1.0


def test_a_numpy_array_in_transport_memory(worker, helpers):
    array = worker.empty_array((512, 512), numpy.float64)
    array[:] = 0.5
    before = worker.stats()["bytes_in_place"]
    assert numpy.array_equal(worker.call(helpers.echo, array), array)
    assert worker.stats()["bytes_in_place"] - before == array.nbytes
    assert worker.empty((0, 3)).shape == (0, 3)


def test_transport_memory_is_sealed_against_shrinking_and_freed_with_its_tensor(worker):
    tensor = worker.empty((1 << 18,))
    fd, offset = shm.locate(memoryview(tensor.numpy()).cast("B"))
    assert offset == 0
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)  # a shrink under the worker's mapping would SIGBUS it
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sourcebox-transport")
    del tensor
    assert shm.locate(memoryview(bytearray(16))) is None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the tensor


@pytest.mark.parametrize("control", [False, True], ids=["protected", "CONTROL-shared-request-mappings"])
def test_the_worker_cannot_change_a_tensor_the_client_lent_it(helpers, monkeypatch, control):
    if control:
        # Both layers off: the worker maps requests shared, this client leaves the seal off.
        monkeypatch.setenv("SOURCEBOX_TEST_SHARED_REQUEST_MAPPINGS", "1")
        monkeypatch.setattr(shm, "LENT_SEALS", 0)
    with runner.Worker(model="none") as worker:
        tensor = worker.empty((1 << 16,))
        tensor.fill_(1.0)
        # The worker saw its own write...
        assert worker.call(helpers.scribble, tensor) == 101.0 * (1 << 16)
    # ...which reaches the client's tensor only when the worker maps requests shared.
    assert float(tensor[0]) == (101.0 if control else 1.0)


def test_a_slice_of_a_larger_tensor_arrives_intact(worker, helpers):
    # capture sends a slice as a compact copy of the part it views; that copy must live
    # until the request is sent (it was freed before, and the worker read garbage).
    whole = torch.arange(256 * 1024, dtype=torch.float32).reshape(256, 1024)
    for rows in (8, 33, 200):
        assert torch.equal(worker.call(helpers.echo, whole[:rows]), whole[:rows])


# A process that holds a client's request descriptor (as a worker taken over by user code
# does: it reads the raw channel) tries to write the client's memory through it.
_HOLDER = '''
import mmap, os, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
landed = []
try:
    mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)[0:1] = b"\\x07"
    landed.append("mmap")
except OSError:
    pass
try:
    os.pwrite(fd, b"\\x07", 1)
    landed.append("pwrite")
except OSError:
    pass
print(",".join(landed))
'''

_CLIENT = '''
import subprocess, sys
from runner import shm
lent = shm.allocate(1 << 16)             # what Worker.empty allocates
pooled = shm.Buffer(1 << 16)             # a pooled request buffer
for memory, fd in ((lent, shm.locate(memoryview(lent))[0]), (pooled._mmap, pooled.fd)):
    memory[0:2] = b"\\x01\\x01"
    holder = subprocess.run([sys.executable, "-c", sys.argv[1], str(fd), "65536"], pass_fds=[fd],
                            capture_output=True, text=True, check=True)
    memory[2:3] = b"\\x01"                  # the client itself still writes through its mapping
    print(holder.stdout.strip() or "-", memory[0:3].hex())
'''


@pytest.mark.parametrize("control", [False, True], ids=["sealed", "CONTROL-shared-request-mappings"])
def test_a_process_holding_a_request_descriptor_cannot_write_the_clients_memory(control):
    env = {key: value for key, value in os.environ.items() if key != "SOURCEBOX_TEST_SHARED_REQUEST_MAPPINGS"}
    if control:
        env["SOURCEBOX_TEST_SHARED_REQUEST_MAPPINGS"] = "1"
    lines = subprocess.run([sys.executable, "-c", _CLIENT, _HOLDER], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert len(lines) == 2  # lent transport memory, then a pooled request buffer
    for line in lines:
        landed, memory = line.split()
        if control:
            assert landed == "mmap,pwrite" and memory == "070701"
        else:
            assert landed == "-" and memory == "010101"
