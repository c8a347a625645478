"""The streaming safetensors writer against ``safetensors.torch.save_file`` itself: the same
tensors must give the same bytes, whatever the order they are written in."""

import filecmp
import random
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import load_weights, make_clip_folder, make_vit_folder
from transformers import CLIPModel

import hf_soups.merge as merge_module
from hf_soups.merge import merge
from hf_soups.safetensors_writer import SafetensorsWriter, plan_safetensors

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]
# Names JSON must escape, non-ASCII, and names whose order differs by code point and by case.
ODD_NAMES = ['a"quote', "back\\slash", "tab\there", "nl\nx", "ctl\x01\x1f", "é", "日本", "Z", "_"]


def _random_tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    shape = [rng.choice([0, 1, 2, 3, 5, 7]) for _ in range(rng.randint(0, 3))]
    values = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randint(0, 2**31)))
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return (values * 50).to(torch.int64).abs().to(dtype)
    return values.to(dtype)


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    names = [f"layer.{rng.randint(0, 99)}.w{'x' * rng.randint(0, 9)}" for _ in range(20)]
    names += rng.sample(ODD_NAMES, 3)
    return {name: _random_tensor(rng, rng.choice(DTYPES)) for name in names}


def _stream(path, tensors, metadata, seed=0):
    """Write ``tensors`` with the writer, in a shuffled order."""
    layout = plan_safetensors({n: (t.dtype, t.shape) for n, t in tensors.items()}, metadata)
    order = list(tensors)
    random.Random(seed).shuffle(order)
    with SafetensorsWriter(path, layout) as writer:
        for name in order:
            writer.write(name, tensors[name])


@pytest.mark.parametrize("seed", range(40))
def test_random_state_dicts_are_byte_identical_to_save_file(tmp_path, seed):
    tensors = _random_state(seed)
    metadata = [None, {"format": "pt"}, {"note": '日本 "x"'}][seed % 3]
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    _stream(tmp_path / "streamed.safetensors", tensors, metadata, seed)
    assert filecmp.cmp(tmp_path / "reference.safetensors", tmp_path / "streamed.safetensors", False)
    with safe_open(tmp_path / "streamed.safetensors", "pt") as handle:
        assert handle.metadata() == metadata
        for name, expected in tensors.items():
            got = handle.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(
                got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
            )


def test_every_dtype_every_header_padding_and_edge_shapes(tmp_path):
    """One tensor of each dtype (the layout's dtype order), 0-dim and empty tensors, and name
    lengths covering every header length modulo 8 (the padding)."""
    for extra in range(8):
        tensors = {f"t{dtype}{'.' * extra}": torch.ones(2, 3).to(dtype) for dtype in DTYPES} | {
            "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 4),
        }
        reference, streamed = tmp_path / f"r{extra}", tmp_path / f"s{extra}"
        save_file(tensors, reference, metadata={"format": "pt"})
        _stream(streamed, tensors, {"format": "pt"}, extra)
        assert reference.read_bytes() == streamed.read_bytes()
    for tensors in [{}, {"only_empty": torch.zeros(0)}, {"x": torch.tensor(True)}]:
        save_file(tensors, tmp_path / "r", metadata=None)
        _stream(tmp_path / "s", tensors, None)
        assert (tmp_path / "r").read_bytes() == (tmp_path / "s").read_bytes()
        (tmp_path / "s").unlink()


def test_refuses_what_was_not_planned_and_a_file_left_incomplete(tmp_path):
    layout = plan_safetensors({"a": (torch.float32, (2,)), "b": (torch.int64, (1,))})
    with pytest.raises(FileExistsError):
        (tmp_path / "taken").write_bytes(b"x")
        SafetensorsWriter(tmp_path / "taken", layout).__enter__()
    assert (tmp_path / "taken").read_bytes() == b"x"
    with (
        pytest.raises(ValueError, match="never written"),
        SafetensorsWriter(tmp_path / "f", layout) as writer,
    ):
        writer.write("a", torch.zeros(2))
    cases = [
        ("c", torch.zeros(2), "not planned"),
        ("a", torch.zeros(3), "plans torch.float32 \\[2\\]"),
        ("a", torch.zeros(2, dtype=torch.float64), "plans torch.float32"),
    ]
    for name, tensor, message in cases:
        file = tmp_path / f"g{name}{tensor.numel()}"
        with pytest.raises(ValueError, match=message), SafetensorsWriter(file, layout) as writer:
            writer.write(name, tensor)
    with (
        pytest.raises(ValueError, match="already written"),
        SafetensorsWriter(tmp_path / "h", layout) as writer,
    ):
        writer.write("a", torch.zeros(2))
        writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="cannot be written"):
        plan_safetensors({"c": (torch.complex64, (1,))})


def _independent_average(folders, dtype=None):
    states = [load_weights(folder) for folder in folders]
    merged = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            merged[name] = first
            continue
        total = sum(state[name].float() for state in states) / len(states)
        merged[name] = total.to(dtype or first.dtype)
    return merged


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merged_shards_are_what_save_file_writes_and_load(tmp_path, one_thread, dtype):
    """Two ingredients averaged by hand (float32 sums, as the engine does) and saved with
    save_file, shard by shard as the merge planned them: the same bytes; from_pretrained loads
    the folder."""
    folders = [make_clip_folder(tmp_path / f"m{i}", i, max_shard_size="20KB") for i in range(2)]
    out = merge(folders, tmp_path / "soup", max_shard_size="12KB", dtype=dtype, progress=False)
    expected = _independent_average(folders, dtype)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    seen = set()
    for shard in shards:
        names = load_file(shard).keys()
        seen |= names
        save_file({n: expected[n] for n in names}, tmp_path / "ref", metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / "ref").read_bytes(), shard.name
    assert seen == expected.keys()
    model, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    for name, tensor in model.state_dict().items():
        if name in expected:
            assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


def test_a_merged_tensor_is_written_before_the_next_is_computed(tmp_path, monkeypatch, one_thread):
    """Memory holds the tensors in flight, not a shard: when a tensor is written, no tensor
    written before its predecessor is still alive (the old engine held the whole shard)."""
    folders = [make_vit_folder(tmp_path / f"v{i}", i) for i in range(2)]
    alive = []
    most_alive = []
    real_write = SafetensorsWriter.write

    def tracking_write(self, name, tensor):
        most_alive.append(sum(ref() is not None for ref in alive))
        real_write(self, name, tensor)
        alive.append(weakref.ref(tensor))

    monkeypatch.setattr(merge_module.SafetensorsWriter, "write", tracking_write)
    out = merge(folders, tmp_path / "soup", progress=False)
    assert len(most_alive) == len(load_weights(out)) > 10
    assert max(most_alive) <= 1


def test_a_merge_leaves_torch_thread_count_as_it_was(tmp_path):
    folders = [make_vit_folder(tmp_path / f"v{i}", i) for i in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge(folders, tmp_path / "soup", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
