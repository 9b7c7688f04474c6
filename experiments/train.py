"""Train a router: `python -m experiments.train --config=experiments/configs/<name>.py --workdir=...`."""

from hrjax.experiment import main

if __name__ == "__main__":
    main()
