"""`python -m benchmarks {list | all | NAME} [flags]`: see `benchmarks/README.md`."""

from benchmarks._suite import main

raise SystemExit(main())
