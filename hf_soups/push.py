"""Old import path of :mod:`hf_soups.hub.push`, kept for code that imports it from here."""

from hf_soups.hub.push import HubPushError, push_folder

__all__ = ["HubPushError", "push_folder"]
