"""transformers CLIP as a zero-shot image classifier whose head can be fine-tuned and averaged.

`CLIPZeroShotClassifier` keeps the whole `CLIPModel` (text tower included, so PAINT can build the
head of another task from it) plus a bias-free linear head initialised from class names and prompt
templates. Its folder is a normal transformers folder (`config.json` with
``architectures: ["CLIPZeroShotClassifier"]`` + safetensors), so it merges file by file.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPPreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ImageClassifierOutput

from hf_soups.models.zero_shot import (
    Template,
    build_zero_shot_head,
    check_classnames,
    normalize_features,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPZeroShotClassifier",
    "clip_zero_shot_head",
    "encode_clip_text",
    "make_word_tokenizer",
]

# transformers keeps this value for CLIP configs written before its PR #24773: with it the text
# tower pools at the highest token id (the end-of-text token of the BPE vocabulary).
_LEGACY_EOS_TOKEN_ID = 2


class CLIPZeroShotClassifier(CLIPPreTrainedModel):
    """A transformers `CLIPModel` with a linear head over L2-normalised image features.

    ``logits = classifier(normalize(clip.get_image_features(pixel_values)))``; the logit scale is
    folded into the classifier weight, as in wise-ft. Labels live in ``config.id2label``.
    """

    config_class = CLIPConfig
    main_input_name = "pixel_values"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.clip = CLIPModel(config)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels, bias=False)
        self.post_init()

    @classmethod
    def from_clip(
        cls,
        clip_model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        classnames: Sequence[str],
        templates: Sequence[Template],
        *,
        progress: bool = True,
    ) -> CLIPZeroShotClassifier:
        """Wrap a copy of `clip_model` with the zero-shot head of `classnames` and `templates`."""
        names = check_classnames(classnames)
        config = copy.deepcopy(clip_model.config)
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        model = cls(config)
        model.clip.load_state_dict(clip_model.state_dict())
        model.to(device=clip_model.device, dtype=clip_model.dtype)
        model.set_head(model.build_head(tokenizer, names, templates, progress=progress), names)
        model.train(clip_model.training)
        return model

    def build_head(
        self,
        tokenizer: PreTrainedTokenizerBase,
        classnames: Sequence[str],
        templates: Sequence[Template],
        *,
        progress: bool = True,
    ) -> torch.Tensor:
        """Zero-shot head ``[num_classes, projection_dim]`` from this model's text tower."""
        return clip_zero_shot_head(self.clip, tokenizer, classnames, templates, progress=progress)

    @torch.no_grad()
    def encode_text(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> torch.Tensor:
        """Projected (not normalised) text embeddings of `prompts`."""
        return encode_clip_text(self.clip, tokenizer, prompts)

    def set_head(self, head: torch.Tensor, classnames: Sequence[str]) -> None:
        """Replace the classifier weight with `head` and the labels with `classnames` (PAINT)."""
        names = check_classnames(classnames)
        expected = (len(names), self.config.projection_dim)
        if tuple(head.shape) != expected:
            raise ValueError(
                f"head has shape {tuple(head.shape)}, expected {expected} "
                f"({len(names)} classnames x projection_dim)"
            )
        weight = self.classifier.weight
        if weight.shape != head.shape:
            self.classifier = nn.Linear(
                expected[1], expected[0], bias=False, device=weight.device, dtype=weight.dtype
            )
            self.classifier.weight.requires_grad_(weight.requires_grad)
        with torch.no_grad():
            self.classifier.weight.copy_(head)
        self.config.id2label = dict(enumerate(names))
        self.config.label2id = {name: i for i, name in enumerate(names)}

    def freeze_text_tower(self) -> None:
        """Stop gradients to the text tower, text projection and logit scale.

        Fine-tuning then leaves them as pre-trained in every ingredient, so any average of the
        ingredients keeps them too and heads for other tasks can still be built from it.
        """
        for module in (self.clip.text_model, self.clip.text_projection):
            module.requires_grad_(False)
        self.clip.logit_scale.requires_grad_(False)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        """Logits over ``config.id2label``; cross-entropy loss when `labels` are given."""
        features = self.clip.get_image_features(pixel_values=pixel_values).pooler_output
        logits = self.classifier(normalize_features(features))
        loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def encode_clip_text(
    clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> torch.Tensor:
    """Projected (not normalised) text embeddings of `prompts` by a transformers `CLIPModel`."""
    text_config = clip.config.text_config
    inputs = tokenizer(
        prompts,
        padding=True,
        truncation=True,
        max_length=text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(clip.device)
    input_ids = inputs["input_ids"]
    eos = text_config.eos_token_id
    # The text tower pools at the first eos token; without one it silently pools position 0
    # and every class gets the same embedding.
    if eos != _LEGACY_EOS_TOKEN_ID and not bool((input_ids == eos).any(dim=1).all()):
        raise ValueError(
            f"the tokenizer's encoding of prompts such as {prompts[0]!r} holds no token "
            f"with text_config.eos_token_id={eos}, where CLIP pools the text embedding; "
            f"the tokenizer's eos_token_id is {tokenizer.eos_token_id}"
        )
    return clip.get_text_features(
        input_ids=input_ids, attention_mask=inputs.get("attention_mask")
    ).pooler_output


def clip_zero_shot_head(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Zero-shot head ``[num_classes, projection_dim]`` from `clip`'s text tower, logit scale
    folded in (see :func:`~hf_soups.models.zero_shot.build_zero_shot_head`)."""
    was_training = clip.training
    clip.eval()
    try:
        return build_zero_shot_head(
            lambda prompts: encode_clip_text(clip, tokenizer, prompts),
            classnames,
            templates,
            clip.logit_scale.detach(),
            progress=progress,
        )
    finally:
        clip.train(was_training)


def make_word_tokenizer(texts: Iterable[str], *, model_max_length: int = 77):
    """A word-level tokenizer whose vocabulary is the (lower-cased) words of `texts`.

    For tiny CLIP models trained offline on a closed set of prompts, where no Hub tokenizer can be
    downloaded. Special tokens: ``<pad>`` (0), ``<unk>`` (1), ``<|startoftext|>`` (2) and
    ``<|endoftext|>`` (3), added around every encoding. Build the text config with
    ``vocab_size=len(tokenizer)``, ``pad_token_id=tokenizer.pad_token_id``,
    ``bos_token_id=tokenizer.bos_token_id`` and ``eos_token_id=tokenizer.eos_token_id``: CLIP
    pools the text embedding at the eos token. The result saves with ``save_pretrained`` and
    loads with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        words.update(piece for piece, _ in pieces)
    specials = [pad, unk, bos, eos]
    vocab = {token: i for i, token in enumerate(specials + sorted(words - set(specials)))}
    if len(vocab) == len(specials):
        raise ValueError("`texts` holds no words to build a vocabulary from")

    backend = Tokenizer(WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        model_max_length=model_max_length,
    )
