"""`python -m elastictrain` is the `elastictrain` command."""

from elastictrain.cli import main

raise SystemExit(main())
