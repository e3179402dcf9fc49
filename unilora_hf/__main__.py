"""``python -m unilora_hf``: the `unilora-hf` command line."""

from .cli import main

raise SystemExit(main())
