"""`python -m experiments.digits [digits|samplers] [flags]` (from the repository root): the digits experiment, or
the samplers' feature-FID against model calls; `--help` lists the flags."""

from experiments.digits.cli import main

raise SystemExit(main())
