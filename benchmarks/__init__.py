"""Benchmarks of the disploss library, beside their results (not part of the installed package): the benchmark
harness (bench: `python -m benchmarks.bench`, from the repository root) and the standalone scripts
(checkpoint_cost.py, stop_poll_cost.py, summarize.py, gpu_check.sh, gpu_evidence.sh)."""
