"""``python -m bnsurgery``."""

from .cli import main

raise SystemExit(main())
