"""Train over seeds and evaluate: `python -m experiments.evaluate --config=... --workdir=...`."""

from hrjax.experiment import evaluate_main

if __name__ == "__main__":
    evaluate_main()
