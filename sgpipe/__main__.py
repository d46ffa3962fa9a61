"""``python -m sgpipe``: the same as the ``sgpipe`` command."""

from sgpipe.cli import main

raise SystemExit(main())
