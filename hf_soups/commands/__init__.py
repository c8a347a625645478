"""Subcommands of the ``hf-soups`` command line, one module each."""
