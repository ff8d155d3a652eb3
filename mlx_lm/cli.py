"""`mlx_lm <command> [flags]`: one entry point for the sub-commands."""

import importlib
import sys

COMMANDS = ["generate", "chat", "cache_prompt", "server", "perplexity"]


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: mlx_lm {{{','.join(COMMANDS)}}} [flags]")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command = sys.argv[1].replace("-", "_").replace(".", "_")
    if command not in COMMANDS:
        print(f"mlx_lm: unknown command '{sys.argv[1]}'. Choose one of: {', '.join(COMMANDS)}.")
        sys.exit(2)
    try:
        module = importlib.import_module(f"mlx_lm.{command}")
    except ImportError:
        print(f"mlx_lm: '{command}' is not available in this version.")
        sys.exit(2)
    sys.argv = [f"mlx_lm.{command}"] + sys.argv[2:]
    module.main()


if __name__ == "__main__":
    main()
