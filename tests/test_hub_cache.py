"""Hub sources resolved by the real ``snapshot_download`` from a cache laid out as the Hub does.

The cache is written in huggingface_hub's own layout (``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` symlinks into ``blobs``, ``refs/<branch or tag>`` holding the
commit, and optionally ``trees/<commit>.json``, the cached file listing that offline resolution
checks a snapshot against), so nothing about resolution is mocked.
"""

import hashlib
import json
import os
import shutil

import huggingface_hub
import pytest
import torch
from tiny import assert_matches_reference, load_weights, make_vit_folder, weighted_reference

from hf_soups.errors import CorruptedCheckpointError, IngredientNotFoundError, UnsafeCheckpointError
from hf_soups.ingredients import Ingredient
from hf_soups.merge import merge

MAIN = "a" * 39 + "1"
OLD = "b" * 39 + "2"


def cache_repo(cache, repo_id, commit, files, *, refs=("main",), listed=()):
    """Put ``files`` (a folder's files) in ``cache`` as snapshot ``commit`` of ``repo_id``.

    ``listed`` names files the repository has on the Hub but the cache lacks: they go in the
    cached tree listing only.
    """
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = storage / "blobs", storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    tree = {}
    for file in files:
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / sha, snapshot))
        tree[file.name] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    for name in listed:
        tree[name] = {"size": 1, "blob_id": "0" * 40}
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    if listed:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": 1, "files": tree})
        )
    return snapshot


@pytest.fixture
def hub(tmp_path):
    """A cache holding org/vit at two commits: main (seed 0) and tag v1 (seed 1, sharded)."""
    cache = tmp_path / "hub"
    main = make_vit_folder(tmp_path / "main", seed=0)
    old = make_vit_folder(tmp_path / "old", seed=1, max_shard_size="8KB")
    cache_repo(cache, "org/vit", MAIN, sorted(main.iterdir()))
    cache_repo(cache, "org/vit", OLD, sorted(old.iterdir()), refs=("v1",))
    return cache, main, old


def _same_weights(ingredient, folder):
    expected = load_weights(folder)
    assert set(ingredient.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ingredient.read(name), tensor), name


def test_repo_id_resolves_to_the_cached_main_commit(hub):
    cache, main, _ = hub
    ingredient = Ingredient.from_source("org/vit", cache_dir=cache)
    assert ingredient.revision == MAIN
    assert ingredient.path == (cache / "models--org--vit" / "snapshots" / MAIN).resolve()
    assert ingredient.source == "org/vit"
    assert ingredient.name == f"org/vit@{MAIN[:10]}"
    assert ingredient.config["model_type"] == "vit"
    _same_weights(ingredient, main)


@pytest.mark.parametrize(
    "source, kwargs",
    [
        (f"org/vit@{OLD}", {}),
        ("org/vit@v1", {}),
        ("org/vit", {"revision": "v1"}),
        ("org/vit", {"revision": OLD}),
    ],
)
def test_pinned_revision_resolves_to_its_commit(hub, source, kwargs):
    cache, _, old = hub
    ingredient = Ingredient.from_source(source, cache_dir=cache, **kwargs)
    assert ingredient.revision == OLD
    assert len({info.file for info in ingredient.tensors.values()}) > 1  # the sharded commit
    _same_weights(ingredient, old)


def test_local_files_only_never_calls_the_hub(hub, monkeypatch):
    cache, main, _ = hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was called despite local_files_only=True")

    for method in ("repo_info", "model_info", "list_repo_tree"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, no_network)
    ingredient = Ingredient.from_source("org/vit", cache_dir=cache, local_files_only=True)
    assert ingredient.revision == MAIN
    _same_weights(ingredient, main)
    ingredient = Ingredient.from_source("org/vit@v1", cache_dir=cache, local_files_only=True)
    assert ingredient.revision == OLD


def test_default_hub_cache_is_honoured(hub, monkeypatch):
    cache, main, _ = hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ingredient = Ingredient.from_source("org/vit")
    assert ingredient.revision == MAIN
    _same_weights(ingredient, main)


@pytest.mark.parametrize(
    "source, fragments",
    [
        ("org/missing", ["org/missing", "not in the Hub cache"]),
        ("org/vit@v9", ["org/vit@v9", "'v9'"]),
        (f"org/vit@{'c' * 40}", [f"org/vit@{'c' * 40}"]),
        ("not a repo id!", ["not a repo id!", "not a valid Hub repo id"]),
    ],
)
def test_unresolvable_sources_name_the_source(hub, source, fragments):
    cache, _, _ = hub
    for local_files_only in (None, True):
        with pytest.raises(IngredientNotFoundError) as caught:
            Ingredient.from_source(source, cache_dir=cache, local_files_only=local_files_only)
        for fragment in fragments:
            assert fragment in str(caught.value)


def test_conflicting_revisions_are_refused(hub):
    cache, _, _ = hub
    with pytest.raises(IngredientNotFoundError, match="v1.*main"):
        Ingredient.from_source("org/vit@v1", revision="main", cache_dir=cache)


def test_pickles_are_not_requested_unless_allowed(tmp_path):
    # The repository also has pickle and TF weights the cache never fetched. Offline, the real
    # snapshot_download accepts the snapshot only if every file matching allow_patterns is there:
    # so hf_soups' patterns leave the pickles out, and asking for them finds the cache incomplete.
    cache = tmp_path / "hub"
    folder = make_vit_folder(tmp_path / "vit", seed=0)
    cache_repo(
        cache,
        "org/mixed",
        MAIN,
        sorted(folder.iterdir()),
        listed=["pytorch_model.bin", "tf_model.h5", "README.md"],
    )
    ingredient = Ingredient.from_source("org/mixed", cache_dir=cache)
    _same_weights(ingredient, folder)
    with pytest.raises(IngredientNotFoundError, match="org/mixed: incomplete.*pytorch_model.bin"):
        Ingredient.from_source("org/mixed", cache_dir=cache, allow_pickle=True)


def _pickle_repo(tmp_path, cache, repo_id, state):
    folder = tmp_path / repo_id.replace("/", "_")
    folder.mkdir()
    shutil.copy(make_vit_folder(tmp_path / "tmpl", seed=0) / "config.json", folder)
    torch.save(state, folder / "pytorch_model.bin")
    cache_repo(cache, repo_id, MAIN, sorted(folder.iterdir()))


def test_pickle_only_repo_needs_allow_pickle(tmp_path):
    cache = tmp_path / "hub"
    state = {"w": torch.randn(4, 3), "ids": torch.arange(5)}
    _pickle_repo(tmp_path, cache, "org/pickled", state)
    with pytest.raises(UnsafeCheckpointError, match="org/pickled.*pytorch_model.bin"):
        Ingredient.from_source("org/pickled", cache_dir=cache)
    ingredient = Ingredient.from_source("org/pickled", cache_dir=cache, allow_pickle=True)
    assert ingredient.revision == MAIN
    assert all(torch.equal(ingredient.read(n), state[n]) for n in state)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_from_the_hub_is_refused(tmp_path):
    cache = tmp_path / "hub"
    marker = tmp_path / "pwned"
    _pickle_repo(tmp_path, cache, "org/evil", {"w": _RunsCode(marker)})
    with pytest.raises(CorruptedCheckpointError, match="cannot be loaded safely"):
        Ingredient.from_source("org/evil", cache_dir=cache, allow_pickle=True)
    assert not marker.exists()


def test_merge_of_hub_ingredients_records_their_commits(hub, tmp_path):
    cache, main, old = hub
    ingredients = [
        Ingredient.from_source("org/vit", cache_dir=cache),
        Ingredient.from_source("org/vit@v1", cache_dir=cache),
    ]
    out = merge(ingredients, tmp_path / "soup", weights=[0.4, 0.6], progress=False)
    assert_matches_reference(load_weights(out), weighted_reference([main, old], [0.4, 0.6]))
    recipe = json.loads((out / "soup.json").read_text())
    assert recipe["ingredients"] == [
        {"source": "org/vit", "revision": MAIN},
        {"source": "org/vit@v1", "revision": OLD},
    ]
    # The output holds files, not symlinks into the cache.
    assert not any(path.is_symlink() for path in out.iterdir())


def _pruned_vit(tmp_path, name, seed, mask_seed):
    """A tiny ViT pruned to 60% with the magnitude mask of the ViT of ``mask_seed``."""
    from transformers import ViTForImageClassification

    from hf_soups.pruning import Magnitude, prune, save_pruned

    reference = ViTForImageClassification.from_pretrained(
        make_vit_folder(tmp_path / f"{name}-ref", seed=mask_seed)
    )
    masks = prune(reference, Magnitude(), 0.6)
    model = ViTForImageClassification.from_pretrained(
        make_vit_folder(tmp_path / f"{name}-dense", seed=seed)
    )
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for parameter_name, mask in masks.items():
            parameters[parameter_name].mul_(mask)
    return save_pruned(model, masks, tmp_path / name)


def test_pruning_masks_come_with_hub_ingredients_and_are_souped(tmp_path):
    from safetensors.torch import load_file

    from hf_soups.builder import SoupBuilder
    from hf_soups.pruning import MASK_FILE

    cache = tmp_path / "hub"
    folders = [_pruned_vit(tmp_path, f"ft{seed}", seed, mask_seed=0) for seed in (1, 2)]
    for folder in folders:
        # The listing names every file, so offline resolution checks each one it asks for.
        cache_repo(cache, f"org/{folder.name}", MAIN, sorted(folder.iterdir()), listed=[MASK_FILE])
    builder = SoupBuilder.from_hub(["org/ft1", "org/ft2"], cache_dir=cache)
    assert all((i.path / MASK_FILE).is_file() for i in builder.ingredients)
    out = builder.uniform().save_pretrained(tmp_path / "soup", progress=False)
    mask = load_file(folders[0] / MASK_FILE)
    written = load_file(out / "model.safetensors")
    assert load_file(out / MASK_FILE).keys() == mask.keys()
    for name, kept in mask.items():
        assert bool((written[name][~kept] == 0).all())
    assert json.loads((out / "soup.json").read_text())["soup"]["pruning"]["masks"] == "shared"


def test_a_hub_mask_is_asked_for_by_its_exact_name(tmp_path):
    # Offline, a snapshot must hold every listed file the patterns match. The mask is asked for:
    # a listed mask missing from the cache makes the snapshot incomplete...
    from hf_soups.pruning import MASK_FILE

    cache = tmp_path / "hub"
    pruned = _pruned_vit(tmp_path, "pruned", 1, mask_seed=0)
    weights_only = [f for f in sorted(pruned.iterdir()) if f.name != MASK_FILE]
    cache_repo(cache, "org/lost-mask", MAIN, weights_only, listed=[MASK_FILE])
    with pytest.raises(IngredientNotFoundError, match=f"org/lost-mask: incomplete.*{MASK_FILE}"):
        Ingredient.from_source("org/lost-mask", cache_dir=cache)
    # ...but by name only: other safetensors the repo lists (another format's weights) are not,
    # and a repository without a mask resolves as before.
    dense = make_vit_folder(tmp_path / "dense", seed=0)
    cache_repo(
        cache,
        "org/dense",
        MAIN,
        sorted(dense.iterdir()),
        listed=["open_clip_model.safetensors", "flax_model.safetensors", "README.md"],
    )
    ingredient = Ingredient.from_source("org/dense", cache_dir=cache)
    _same_weights(ingredient, dense)
    assert not (ingredient.path / MASK_FILE).exists()
