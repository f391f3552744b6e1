"""`nanoqwen`: one click group mounting the commands of convert.py, train.py and generate.py."""
import importlib

import click


class _Lazy(click.Group):
    """Imports a script only when its command runs (or is listed), so `nanoqwen --help` stays quick."""
    COMMANDS = {"convert": ("convert", "convert_cli"), "parity": ("convert", "parity"),
                "train": ("train", "main"), "generate": ("generate", "main")}

    def list_commands(self, ctx):
        return list(self.COMMANDS)

    def get_command(self, ctx, name):
        if name not in self.COMMANDS:
            return None
        mod, attr = self.COMMANDS[name]
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            return click.Command(name, help=f"(unavailable: {e})")


@click.group(cls=_Lazy)
def main():
    """nanoqwen: convert, train, generate and check logit parity for Qwen models (JAX and PyTorch)."""


if __name__ == "__main__":
    main()
