"""A checkpoint folder can make hf_soups read only regular files inside it (or, for a Hub cache
snapshot, in its repository's blob store), and a merged folder takes only known model files.

"Never read" is checked with an audit hook that records every file Python opens: a refused file
must not even be opened.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file
from tiny import assert_matches_reference, load_weights, make_vit_folder, weighted_reference

from hf_soups.errors import CorruptedCheckpointError
from hf_soups.ingredients import Ingredient
from hf_soups.merge import merge

_opened: list[str] | None = None


def _record_opens(event, args):
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # cannot be removed; records only inside never_opened()


@contextmanager
def never_opened(*files):
    """Fail if any of ``files`` (resolved) is opened inside the block."""
    global _opened
    _opened = []
    try:
        yield
    finally:
        opened, _opened = {os.path.realpath(path) for path in _opened}, None
    assert not opened & {os.path.realpath(file) for file in files}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("containment")
    return (
        make_vit_folder(root / "a", seed=0),
        make_vit_folder(root / "b", seed=1),
        make_vit_folder(root / "sharded", seed=2, max_shard_size="8KB"),
    )


@pytest.fixture
def folders(pristine, tmp_path):
    """Fresh copies of a plain ViT, a second one, a sharded one; and an outside folder holding a
    valid copy of the sharded model's weights (what a malicious index would point at)."""
    a, b, sharded = (shutil.copytree(folder, tmp_path / folder.name) for folder in pristine)
    outside = shutil.copytree(sharded, tmp_path / "outside")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return a, b, sharded, outside, outputs


def _rewrite_index(folder, edit):
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    edit(index)
    index_file.write_text(json.dumps(index))
    return index_file


def _fails(outputs, sources, fragments, error=CorruptedCheckpointError):
    with pytest.raises(error) as caught:
        merge(sources, outputs / "soup", progress=False)
    message = str(caught.value)
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    assert "\n" not in message
    assert os.listdir(outputs) == []
    return message


# ---------------------------------------------------------------- shard indexes


@pytest.mark.parametrize("spelling", ["relative", "absolute", "dotdot inside"])
def test_index_entry_outside_the_folder_is_refused_unread(folders, spelling):
    a, _, sharded, outside, outputs = folders
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    target = outside / shard
    entry = {
        "relative": os.path.relpath(target, sharded),
        "absolute": str(target),
        # Resolves inside, but a shard name has no business climbing: refused all the same.
        "dotdot inside": f"../{sharded.name}/{shard}",
    }[spelling]
    index_file = _rewrite_index(sharded, lambda index: index["weight_map"].update({name: entry}))
    with never_opened(target):
        _fails(outputs, [a, sharded], [index_file, repr(entry), repr(name), "inside"])


def test_index_entry_with_a_nul_byte_is_refused(folders):
    a, _, sharded, _, outputs = folders
    index_file = _rewrite_index(
        sharded,
        lambda index: index["weight_map"].update(
            {name: file + "\0" for name, file in list(index["weight_map"].items())[:1]}
        ),
    )
    _fails(outputs, [a, sharded], [index_file, "not a file name inside"])


def test_shard_symlinked_outside_the_folder_is_refused_unread(folders):
    a, _, sharded, outside, outputs = folders
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(outside / shard.name)
    with never_opened(outside / shard.name):
        _fails(outputs, [a, sharded], ["model.safetensors.index.json", shard.name, "outside"])


def test_weights_symlinked_outside_the_folder_are_refused_unread(folders):
    a, b, _, _, outputs = folders
    weights = b / "model.safetensors"
    secret = b.parent / "secret.safetensors"
    weights.rename(secret)
    weights.symlink_to(secret)
    with never_opened(secret):
        _fails(outputs, [a, b], [weights, "outside"])


def test_symlinks_inside_the_folder_are_followed(folders):
    a, b, sharded, _, outputs = folders
    expected = weighted_reference([a, sharded], [0.5, 0.5])
    (sharded / "weights").mkdir()
    for shard in sharded.glob("model-*.safetensors"):
        shard.rename(sharded / "weights" / shard.name)
        shard.symlink_to(os.path.join("weights", shard.name))
    weights = b / "model.safetensors"
    (b / "store").mkdir()
    weights.rename(b / "store" / "weights")
    weights.symlink_to(os.path.join("store", "weights"))
    out = merge([a, sharded], outputs / "soup", progress=False)
    assert_matches_reference(load_weights(out), expected)
    Ingredient.from_folder(b)  # indexed through its in-folder symlink


@pytest.mark.parametrize(
    "index",
    [
        [],
        {"metadata": {}},
        {"weight_map": None},
        {"weight_map": [["vit.embeddings.cls_token", "model-00001-of-00002.safetensors"]]},
        {"weight_map": "model-00001-of-00002.safetensors"},
    ],
    ids=["list", "no weight_map", "null weight_map", "list weight_map", "string weight_map"],
)
def test_malformed_index_is_one_line(folders, index):
    a, _, sharded, _, outputs = folders
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(outputs, [a, sharded], ["model.safetensors.index.json"])


@pytest.mark.parametrize("value", [None, 5, ["model-00001-of-00002.safetensors"], {"a": 1}])
def test_index_entry_of_the_wrong_type_is_one_line(folders, value):
    a, _, sharded, _, outputs = folders
    index_file = _rewrite_index(
        sharded, lambda index: index["weight_map"].update({"vit.embeddings.cls_token": value})
    )
    _fails(outputs, [a, sharded], [index_file, "'vit.embeddings.cls_token'", "shard file name"])


@pytest.mark.parametrize("file", ["model.safetensors.index.json", "config.json"])
def test_deeply_nested_json_is_one_line(folders, file):
    a, _, sharded, _, outputs = folders
    (sharded / file).write_text('{"a":' + "[" * 100_000 + "]" * 100_000 + "}")
    _fails(outputs, [a, sharded], [sharded / file, "nested more than 127 deep"])


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"model_type": "vit"', b"\xff\xfe{}"])
def test_bad_config_is_one_line(folders, content):
    a, b, _, _, outputs = folders
    (b / "config.json").write_bytes(content)
    _fails(outputs, [a, b], [b / "config.json"])


# ---------------------------------------------------------------- file kinds


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["model.safetensors", "shard"])
def test_fifo_weights_are_refused_without_hanging(folders, where):
    a, b, sharded, _, outputs = folders
    folder = sharded if where == "shard" else b
    fifo = sorted(folder.glob("model*.safetensors"))[0]
    fifo.unlink()
    os.mkfifo(fifo)
    _fails(outputs, [a, folder], [fifo, "not a regular file"])


@pytest.mark.timeout(30)
def test_fifo_pickle_is_refused_without_hanging(folders):
    _, b, _, _, _ = folders
    (b / "model.safetensors").unlink()
    os.mkfifo(b / "pytorch_model.bin")
    with pytest.raises(CorruptedCheckpointError, match="pytorch_model.bin: not a regular file"):
        Ingredient.from_folder(b, allow_pickle=True)


@pytest.mark.parametrize("link", ["broken", "loop"])
def test_broken_and_looping_weight_symlinks_are_one_line(folders, link):
    a, b, _, _, outputs = folders
    weights = b / "extra.safetensors"
    if link == "broken":
        weights.symlink_to("gone.safetensors")
    else:
        weights.symlink_to("loop.safetensors")
        (b / "loop.safetensors").symlink_to("extra.safetensors")
    _fails(outputs, [a, b], [b, "symlink"])


@pytest.mark.parametrize("file", ["config.json", "ingredient.json"])
def test_config_symlinked_outside_the_folder_is_refused_unread(folders, file):
    a, b, _, outside, outputs = folders
    secret = outside / "private.json"
    secret.write_text('{"model_type": "vit", "token": "hf_secret"}')
    (b / file).unlink(missing_ok=True)
    (b / file).symlink_to(secret)
    with never_opened(secret):
        message = _fails(outputs, [a, b], [b / file, "outside"])
    assert "hf_secret" not in message


def test_folder_named_like_weights_is_refused(folders):
    a, b, _, _, outputs = folders
    (b / "extra.safetensors").mkdir()
    _fails(outputs, [a, b], [b / "extra.safetensors", "not a regular file"])


@pytest.mark.timeout(30)
def test_fifo_config_and_tokenizer_neither_hang_nor_are_copied(folders, caplog):
    a, b, _, _, outputs = folders
    os.mkfifo(a / "tokenizer.json")
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge([a, b], outputs / "soup", progress=False)
    assert not (out / "tokenizer.json").exists()
    assert any("tokenizer.json" in r.message and "regular" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "content",
    [
        b"hf_SECRETTOKEN0123456789 password=hunter2\n" * 4,
        b"\x10\x00\x00\x00\x00\x00\x00\x00password=hunter2",
        b"\x10\x00\x00\x00\x00\x00\x00\x00\xffpassword=hunter2",
    ],
    ids=["text", "small length then text", "not utf-8"],
)
def test_errors_do_not_quote_file_content(folders, content):
    a, b, _, _, outputs = folders
    (b / "model.safetensors").write_bytes(content)
    message = _fails(outputs, [a, b], [b / "model.safetensors"])
    leaked = ["SECRET", "hunter2", "password", "\\x"]
    prefix = int.from_bytes(content[:8], "little")
    if prefix > 2**32:  # the length prefix of a text file is its first 8 characters, as a number
        leaked += [str(prefix), hex(prefix)[2:]]
    for fragment in leaked:
        assert fragment not in message, (fragment, message)


# ---------------------------------------------------------------- files copied into the soup

NOT_COPIED = [
    "model.onnx",
    "model.gguf",
    "openvino_model.xml",
    "openvino_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
    "pytorch_model.bin",
    "model.ckpt",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "training_args.bin",
    "trainer_state.json",
    "ingredient.json",
    "README.md",
    "notes.txt",
    "results.json",
    ".env",
    "id_rsa",
    "model.safetensors.index.json.bak",
]
COPIED = [
    "config.json",
    "preprocessor_config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
]


def test_only_known_model_files_are_copied(folders, caplog):
    a, b, _, outside, outputs = folders
    for name in NOT_COPIED:
        (a / name).write_text('{"private": true}' if name.endswith(".json") else f"private {name}")
    (a / "onnx").mkdir()
    (a / "onnx" / "model.onnx").write_bytes(b"onnx")
    for name in COPIED[2:]:
        (a / name).write_text(f"{name} of a")
    (outside / "secret.json").write_text('{"token": "hf_secret"}')
    (a / "tokenizer.json").symlink_to(outside / "secret.json")  # outside: skipped
    (a / "tokenizer_config.json").rename(a / "onnx" / "tok.json")
    (a / "tokenizer_config.json").symlink_to(os.path.join("onnx", "tok.json"))  # inside: copied

    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge([a, b], outputs / "soup", progress=False)

    assert sorted(os.listdir(out)) == sorted([*COPIED, "model.safetensors", "soup.json", "README.md"])
    for name in COPIED:
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (a / name).read_bytes(), name
    assert any("tokenizer.json" in r.message and "outside" in r.message for r in caplog.records)


def _cache_snapshot(cache, repo_id, commit, folder):
    """``folder`` as a Hub cache snapshot: files in ``blobs``, symlinks in the snapshot."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = storage / "blobs", storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_snapshot_follows_links_into_its_blobs_only(folders, tmp_path, caplog):
    a, b, _, _, outputs = folders
    cache = tmp_path / "hub"
    snapshot = _cache_snapshot(cache, "org/a", "a" * 40, a)
    other = _cache_snapshot(cache, "org/b", "b" * 40, b)
    out = merge([snapshot, b], outputs / "soup", progress=False)
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))
    assert (out / "preprocessor_config.json").read_bytes() == (
        a / "preprocessor_config.json"
    ).read_bytes()
    shutil.rmtree(out)

    # A snapshot link into another repository's blobs leaves its own store: refused.
    (snapshot / "preprocessor_config.json").unlink()
    (snapshot / "preprocessor_config.json").symlink_to(other / "preprocessor_config.json")
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge([snapshot, b], outputs / "soup", progress=False)
    assert not (out / "preprocessor_config.json").exists()
    assert any("preprocessor_config.json" in r.message for r in caplog.records)
    shutil.rmtree(out)
    weights = snapshot / "model.safetensors"
    weights.unlink()
    weights.symlink_to(os.path.realpath(other / "model.safetensors"))
    with never_opened(other / "model.safetensors"):
        _fails(outputs, [snapshot, b], [weights, "outside"])


def test_safetensors_file_holding_a_tensor_its_index_omits_is_corrupted(folders):
    # The index is the checkpoint's table of contents: a shard holding more is not trusted.
    a, _, sharded, _, outputs = folders
    index_file = _rewrite_index(
        sharded, lambda index: index["weight_map"].pop("vit.embeddings.cls_token")
    )
    _fails(outputs, [a, sharded], [index_file, "'vit.embeddings.cls_token'", "does not list"])


def test_equivalent_spellings_of_a_shard_name_are_one_file(folders):
    a, _, sharded, _, outputs = folders
    expected = weighted_reference([a, sharded], [0.5, 0.5])
    _rewrite_index(
        sharded,
        lambda index: index["weight_map"].update(  # every other entry, so both spellings mix
            {name: f"./{file}" for name, file in list(index["weight_map"].items())[::2]}
        ),
    )
    out = merge([a, sharded], outputs / "soup", progress=False)
    assert_matches_reference(load_weights(out), expected)


def test_tensor_names_are_cut_short_in_messages(tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    save_file({"x" * 10_000: torch.ones(2)}, folder / "model.safetensors")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[data.index(b'"F32"') : data.index(b'"F32"') + 5] = b'"F31"'
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptedCheckpointError) as caught:
        Ingredient.from_folder(folder)
    assert "unknown dtype 'F31'" in str(caught.value) and len(str(caught.value)) < 500
