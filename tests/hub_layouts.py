"""Hub repositories rebuilt file for file with tiny configs, for ``test_layouts.py``.

Each builder writes a folder with the file names, config keys and tensor names of a real repo:

- ``openai_clip_repo``: ``openai/clip-vit-base-patch32`` (``CLIPModel``; legacy token ids 0/1/2 in
  the text config, ``position_ids`` buffers in ``model.safetensors``, a BPE tokenizer from
  ``vocab.json`` + ``merges.txt`` with ``<|endoftext|>`` the highest id, ``preprocessor_config.json``
  in the old ``CLIPFeatureExtractor`` style). Its ``pytorch_model.bin``, ``tf_model.h5`` and
  ``flax_model.msgpack`` are in :data:`OPENAI_NOT_CACHED`: listed in the repo, never fetched.
- ``fusion_bench_vision_repo``: ``tanganke/clip-vit-base-patch32_<task>`` (``CLIPVisionModel``,
  ``vision_model.*`` keys, as transformers 4 saved them).
- ``open_clip_repo``: an open_clip ``push_to_hf_hub`` repo (``open_clip_config.json`` +
  ``open_clip_model.safetensors``).
- ``laion_repo``: a laion CLIP repo holding both formats (and ``open_clip_pytorch_model.bin``).
- ``vit_repo``: a ``ViTForImageClassification`` fine-tune with ``id2label``, optionally
  pickle-only (``pytorch_model.bin``).

Fine-tunes are a shared pre-trained start plus seeded noise, so they are soupable.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tiny_open_clip import TINY_OPEN_CLIP_CFG, register_tiny_open_clip
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification

OPENAI_NOT_CACHED = ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "README.md"]
CLIP_IMAGE_SIZE = 16
CLIP_CONTEXT = 16
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    # GPT-2's reversible byte -> printable character map, which CLIP's BPE vocabulary is built on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_vocab() -> dict[str, int]:
    """Byte symbols, the same with ``</w>``, two merges, then the special tokens (highest ids,
    as in CLIP's 49,408-token vocabulary, so legacy pooling at the highest id finds the eos)."""
    symbols = _bytes_to_unicode()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "th", "the</w>", BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def _special(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    from transformers import CLIPTokenizer

    (folder / "vocab.json").write_text(json.dumps(clip_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    # tokenizer.json as the fast tokenizer writes it, converted from the two files above.
    built = CLIPTokenizer.from_pretrained(folder)
    (folder / "tokenizer.json").write_text(built.backend_tokenizer.to_str())
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": _special(BOS),
                "eos_token": _special(EOS),
                "pad_token": EOS,
                "unk_token": _special(EOS),
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": _special(BOS),
                "do_lower_case": True,
                "eos_token": _special(EOS),
                "errors": "replace",
                "model_max_length": CLIP_CONTEXT,
                "name_or_path": "openai/clip-vit-base-patch32",
                "pad_token": EOS,
                "processor_class": "CLIPProcessor",
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": _special(EOS),
            }
        )
    )


def write_clip_preprocessor(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": CLIP_IMAGE_SIZE,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": OPENAI_MEAN,
                "image_std": OPENAI_STD,
                "resample": 3,
                "size": CLIP_IMAGE_SIZE,
            }
        )
    )


def clip_config() -> CLIPConfig:
    """A tiny CLIP with openai's legacy text token ids (pad 1, bos 0, eos 2)."""
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(clip_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CLIP_CONTEXT,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            image_size=CLIP_IMAGE_SIZE,
            patch_size=8,
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=8,
    )


def pretrained_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in CLIPModel(clip_config()).state_dict().items()}


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """A fine-tune: every floating tensor moved by seeded noise of `scale` times its spread."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator) * tensor.std() * scale
            out[name] = (tensor + noise).contiguous()
        else:
            out[name] = tensor.clone().contiguous()
    return out


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})


def openai_clip_repo(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    config = clip_config().to_dict()
    config["architectures"] = ["CLIPModel"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = dict(state)
    # openai's model.safetensors (converted from its pytorch_model.bin) keeps these buffers.
    tensors["text_model.embeddings.position_ids"] = torch.arange(CLIP_CONTEXT)[None]
    patches = (CLIP_IMAGE_SIZE // 8) ** 2 + 1
    tensors["vision_model.embeddings.position_ids"] = torch.arange(patches)[None]
    _save(tensors, folder / "model.safetensors")
    write_clip_preprocessor(folder)
    write_clip_tokenizer(folder)
    return folder


def fusion_bench_vision_repo(folder: Path, clip_state: dict[str, torch.Tensor]) -> Path:
    """The vision tower of a CLIP state, as a ``CLIPVisionModel`` repo (``vision_model.*``)."""
    folder.mkdir(parents=True)
    vision = clip_config().vision_config.to_dict()
    vision.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    (folder / "config.json").write_text(json.dumps(vision, indent=2))
    tensors = {k: v for k, v in clip_state.items() if k.startswith("vision_model.")}
    _save(tensors, folder / "model.safetensors")
    return folder


def open_clip_config() -> dict:
    return {
        "model_cfg": copy.deepcopy(TINY_OPEN_CLIP_CFG),
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
    }


def pretrained_open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = open_clip.create_model(register_tiny_open_clip())
    return {k: v.clone() for k, v in model.state_dict().items()}


def open_clip_repo(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(), indent=2))
    _save(state, folder / "open_clip_model.safetensors")
    return folder


def laion_repo(
    folder: Path, clip_state: dict[str, torch.Tensor], open_clip_state: dict[str, torch.Tensor]
) -> Path:
    """Both formats: the transformers files of ``openai_clip_repo`` plus open_clip's three."""
    openai_clip_repo(folder, clip_state)
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(), indent=2))
    _save(open_clip_state, folder / "open_clip_model.safetensors")
    torch.save(open_clip_state, folder / "open_clip_pytorch_model.bin")
    return folder


VIT_LABELS = {0: "cat", 1: "dog", 2: "bird"}


def vit_config() -> ViTConfig:
    return ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(VIT_LABELS),
        label2id={v: k for k, v in VIT_LABELS.items()},
    )


def pretrained_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """On-disk names (save_pretrained's), which differ from ViT's in-memory ones."""
    import tempfile

    from safetensors.torch import load_file

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        ViTForImageClassification(vit_config()).save_pretrained(scratch)
        return load_file(Path(scratch) / "model.safetensors")


def vit_repo(folder: Path, state: dict[str, torch.Tensor], *, pickle_only: bool = False) -> Path:
    folder.mkdir(parents=True)
    config = vit_config().to_dict()
    config["architectures"] = ["ViTForImageClassification"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if pickle_only:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        _save(state, folder / "model.safetensors")
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_normalize": True,
                "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "ViTImageProcessor",
                "image_std": [0.5, 0.5, 0.5],
                "resample": 2,
                "rescale_factor": 0.00392156862745098,
                "size": {"height": 16, "width": 16},
            }
        )
    )
    return folder
