"""`hrjax route --bundle=BUNDLE "question" ["question" ...]`: routes questions through a bundle's pool
and prints each route (model per hop, or STOP), each hop's answer, tokens and cost.

  --json                        one JSON object per question (`RouteState.to_dict` plus the model and lambda)
  --model=hrjax-router@cost=X   a served trade-off (`BundleRouter.offers`; default: the bundle's own)
  --cost_lambda=X               a lambda the router serves, instead of --model
"""

from __future__ import annotations

import argparse
import json
import sys

from hrjax.errors import HrjaxError


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog=argv[0], description="Route questions with a serving bundle.")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("questions", nargs="+", metavar="QUESTION")
    trade_off = parser.add_mutually_exclusive_group()
    trade_off.add_argument("--model", default=None, help="a served model name, e.g. hrjax-router@cost=0.5")
    trade_off.add_argument("--cost_lambda", type=float, default=None)
    parser.add_argument("--max_tokens", type=int, default=None, help="per hop (default: the bundle's)")
    parser.add_argument("--json", action="store_true", help="one JSON object per question")
    args = parser.parse_args(argv[1:])

    from hrjax.serving.bundle import load_bundle
    from hrjax.serving.router import BundleRouter

    try:
        router = BundleRouter(load_bundle(args.bundle))
        model = args.model or router.served_name
        if args.cost_lambda is not None:
            model = f"{router.served_name}@lambda={args.cost_lambda!r}"
        lam = router.lambda_for(model)
        states = router.route(args.questions, lam, router.sampling(max_tokens=args.max_tokens))
    except (HrjaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for state in states:
        if args.json:
            print(json.dumps({**state.to_dict(), "model": model, "cost_lambda": lam}))
            continue
        print(f"question: {state.question}")
        for i, hop in enumerate(state.hops, 1):
            print(f"  hop {i}: {hop.model} -> {hop.text!r}  ({hop.tokens_in} in, {hop.tokens_out} out, "
                  f"cost {hop.cost:.4f})")
        route = " > ".join(state.to_dict()["route"])
        print(f"  route: {route};  answer: {state.answer!r};  total cost {state.total_cost:.4f}  "
              f"({model}, lambda {lam:g})")
    return 0
