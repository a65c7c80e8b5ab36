"""`disploss bench`: the benchmark harness of the source checkout (benchmarks/bench; why a dispatcher:
disploss.commands.checkout)."""

from disploss.commands import checkout

STUDY = "benchmarks/bench"


def add_arguments(parser):
    checkout.add_arguments(parser, STUDY)


def run(args) -> int:
    return checkout.run(args, STUDY)
