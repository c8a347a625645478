"""Every error hf_soups raises lives in hf_soups.errors, is exported, and keeps its old paths."""

import inspect

import hf_soups
from hf_soups import errors


def test_every_error_is_defined_in_errors_and_exported():
    defined = {
        name
        for name, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, Exception) and value.__module__ == errors.__name__
    }
    assert {
        "RecipeError",
        "UnsupportedArchitectureError",
        "HubPushError",
        "ZeroShotTooWeakError",
        "UnpairedResultsError",
    } <= defined
    assert defined <= set(hf_soups.__all__)
    for name in defined:
        assert getattr(hf_soups, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), errors.HfSoupsError)


def test_old_import_paths_give_the_same_classes():
    from hf_soups.demo import ZeroShotTooWeakError as from_demo
    from hf_soups.demo.pretrain import ZeroShotTooWeakError as from_pretrain
    from hf_soups.models import UnsupportedArchitectureError as from_models
    from hf_soups.models.transformers_auto import UnsupportedArchitectureError as from_auto
    from hf_soups.patching import RecipeError as from_patching
    from hf_soups.patching.recipe import RecipeError as from_recipe
    from hf_soups.push import HubPushError as from_push

    assert from_demo is from_pretrain is errors.ZeroShotTooWeakError
    assert from_models is from_auto is errors.UnsupportedArchitectureError
    assert from_patching is from_recipe is errors.RecipeError
    assert from_push is errors.HubPushError


def test_value_errors_stay_value_errors():
    # Callers that caught ValueError before the move still catch these.
    for error in (
        errors.RecipeError,
        errors.UnsupportedArchitectureError,
        errors.UnpairedResultsError,
    ):
        assert issubclass(error, ValueError)
