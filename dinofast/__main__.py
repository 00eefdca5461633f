"""`python -m dinofast COMMAND ...`: one entry point, one module per command."""
import sys


def _convert(argv):
    from dinofast.models.checkpoint import main

    return main(argv)


COMMANDS = {"convert": (_convert, "write an original-layout DINOv3 checkpoint as a transformers directory")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m dinofast COMMAND [ARGS]\n\ncommands:", file=sys.stderr)
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:10s} {help_}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
