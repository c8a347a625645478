"""Model cards for merged model folders, rendered from the recipe (``soup.json``) alone.

:func:`write_card` reads a folder's :class:`~hf_soups.recipe.Recipe`, builds the
``huggingface_hub`` metadata (:func:`card_data`: ``base_model`` for the Hub ingredients,
``license``, ``library_name`` and ``pipeline_tag`` from the model family, tags, datasets, and a
``model-index`` of this model's own scores) and renders the body from the templates in
``model_cards/`` (``soup.md`` for soups and other merges, ``wise_ft.md`` for WiSE-FT and PAINT):
every model's scores with their intervals, the greedy selection or the alpha sweep, how to load
and rebuild the model, and the papers to cite. Every path that writes a model folder writes its
card (:func:`hf_soups.merge.merge` calls :func:`write_card`), and ``hf-soups card DIR``
rewrites it. A card shows local sources by their folder names only.

The modules: :mod:`~hf_soups.cards.metadata` (front matter), :mod:`~hf_soups.cards.family`
(everything that depends on the model family), :mod:`~hf_soups.cards.scores` (typed views of
the recorded scores), :mod:`~hf_soups.cards.tables` and :mod:`~hf_soups.cards.text` (the body),
:mod:`~hf_soups.cards.sparsity` and :mod:`~hf_soups.cards.size` (a sparse model's mask; the
parameters and FLOPs), :mod:`~hf_soups.cards.render` (templates and the file), and
:mod:`~hf_soups.cards.reduction` (the card of a structurally reduced model, from its
``reduction.json``). The templates ship inside the package
(``hf_soups/model_cards`` is a symlink to the repository's ``model_cards/``) and are read with
:mod:`importlib.resources`.
"""

from hf_soups.cards.family import family_metadata
from hf_soups.cards.metadata import CARD_FILE, card_data
from hf_soups.cards.render import render_card, write_card

__all__ = ["CARD_FILE", "card_data", "family_metadata", "render_card", "write_card"]
