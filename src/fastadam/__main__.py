"""``python -m fastadam``: see fastadam.cli."""

from fastadam.cli import main

raise SystemExit(main())
