"""`disploss experiment digits|samplers`: the digits experiment of the source checkout (experiments/digits; why a
dispatcher: disploss.commands.checkout)."""

from disploss.commands import checkout

STUDY = "experiments/digits"


def add_arguments(parser):
    checkout.add_arguments(parser, STUDY)


def run(args) -> int:
    return checkout.run(args, STUDY)
