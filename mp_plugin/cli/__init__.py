"""Subcommands of the ``mp-plugin`` CLI, one module each."""
