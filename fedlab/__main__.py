"""Lets ``python -m fedlab`` run the ``fedlab`` command (used where the script is not on PATH)."""

from fedlab.cli import main

raise SystemExit(main())
