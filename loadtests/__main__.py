"""``python -m loadtests``: see ``loadtests/README.md``."""

from loadtests.cli import main

raise SystemExit(main())
