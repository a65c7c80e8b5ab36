"""`python -m benchmarks.bench [flags]` (from the repository root): the benchmark; `--help` lists the flags."""

from benchmarks.bench.cli import main

raise SystemExit(main())
