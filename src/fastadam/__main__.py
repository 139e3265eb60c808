"""``python -m fastadam``: the app's command line, fastadam.app.cli."""

from fastadam.app.cli import main

raise SystemExit(main())
