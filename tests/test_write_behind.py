"""Writes in a second thread (hf_soups.write_behind): the file is what ``save_file`` writes, no
buffer is handed out while a write still reads it, and a failed write is not lost."""

import filecmp
import threading

import pytest
import torch
from safetensors.torch import save_file

from hf_soups.safetensors_writer import SafetensorsWriter, plan_safetensors
from hf_soups.write_behind import WriteBehind

# Sizes around the small buffer's (16 elements below): tensors that fit it and tensors that
# must wait for the large one.
SHAPES = [(40,), (3, 5), (16,), (8, 8), (2,), (17,), (4, 4), (40,), (1,)]


class BlockingWriter:
    """A writer whose writes wait for the test's go-ahead, recording what they were given."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.written = []

    def write(self, name, tensor):
        self.started.set()
        assert self.release.wait(5)
        self.written.append((name, tensor.clone()))


def test_file_is_byte_identical_to_save_file(tmp_path):
    expected = {f"t{i}": torch.randn(shape) for i, shape in enumerate(SHAPES)}
    save_file(expected, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    layout = plan_safetensors(
        {n: (t.dtype, t.shape) for n, t in expected.items()}, {"format": "pt"}
    )
    largest = max(t.numel() for t in expected.values())
    with (
        SafetensorsWriter(tmp_path / "streamed.safetensors", layout) as writer,
        WriteBehind(writer, largest, overlap_bytes=16 * 4) as writes,
    ):
        for name, tensor in expected.items():
            # What a merge does: compute into the buffer it is given, then hand it over.
            writes.write(name, writes.buffer(tensor.shape).copy_(tensor))
    assert filecmp.cmp(
        tmp_path / "reference.safetensors", tmp_path / "streamed.safetensors", shallow=False
    )


def test_no_buffer_in_flight_is_handed_out():
    writer = BlockingWriter()
    with WriteBehind(writer, 40, overlap_bytes=16 * 4) as writes:
        large = writes.buffer(torch.Size([40])).fill_(1.0)
        writes.write("large", large)
        assert writer.started.wait(5)
        # The large buffer is being written: a tensor that fits the small one goes there...
        small = writes.buffer(torch.Size([16]))
        assert small.untyped_storage().data_ptr() != large.untyped_storage().data_ptr()
        small.fill_(2.0)
        # ...and one that does not waits for the write in flight, which has not been allowed on.
        got = []
        waiter = threading.Thread(target=lambda: got.append(writes.buffer(torch.Size([17]))))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive() and not got
        writer.release.set()
        waiter.join(5)
        assert got and got[0].untyped_storage().data_ptr() == large.untyped_storage().data_ptr()
    name, written = writer.written[0]
    assert name == "large" and torch.equal(written, torch.ones(40))


class FailingWriter:
    def write(self, name, tensor):
        raise OSError(f"disk full writing {name}")


def test_a_failed_write_is_raised_by_the_next_write():
    writes = WriteBehind(FailingWriter(), 4)
    writes.write("a", torch.zeros(4))
    with pytest.raises(OSError, match="disk full writing a"):
        writes.write("b", torch.zeros(4))


def test_a_failed_last_write_is_raised_on_exit():
    writes = WriteBehind(FailingWriter(), 4)
    writes.write("last", torch.zeros(4))
    with pytest.raises(OSError, match="disk full writing last"):
        writes.__exit__(None, None, None)


def test_an_error_in_the_caller_waits_for_the_write_in_flight_and_wins():
    writer = BlockingWriter()

    def compute_fails():
        with WriteBehind(writer, 4) as writes:
            writes.write("a", torch.zeros(4))
            assert writer.started.wait(5)
            threading.Timer(0.2, writer.release.set).start()
            raise KeyError("merge failed")

    with pytest.raises(KeyError, match="merge failed"):
        compute_fails()
    # The file stays open until the write reading it has finished.
    assert [name for name, _ in writer.written] == ["a"]
