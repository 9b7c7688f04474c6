"""A lambda-conditioned router against fixed-lambda routers at each lambda of the sweep:
`python -m experiments.trade_offs --config=experiments/configs/specialist_world.py:conditioned --workdir=...`."""

from hrjax.experiment import trade_offs_main

if __name__ == "__main__":
    trade_offs_main()
