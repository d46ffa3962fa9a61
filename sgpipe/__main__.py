"""``python -m sgpipe``: the same as the ``sgpipe`` command."""

from sgpipe.cli import program

# Guarded: importing this module (tools that import every module) must not run the command.
if __name__ == "__main__":
    raise SystemExit(program())
