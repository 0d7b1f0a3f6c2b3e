"""`python -m moetune ...` and `accelerate launch -m moetune train RECIPE`."""

from moetune.cli import run


run()
