"""The serving runtime: a bundle's exported policy and encoder driving its pool, without the training code.

A route is the training env's episode, greedy: the same hop prompts (`hrjax.env.mdp.hop_prompt`), the
same answers, costs (`hop_cost`, normalised by `cost_unit`), observations (context text embedded by the
exported encoder as the bundle's context view says, `embed_contexts`; hop index, `cost_features`,
`action_mask`) and the trained policy's argmax action.

API (the server codes against exactly this)::

    bundle = hrjax.serving.bundle.load_bundle(path)     # verified; BundleError on tamper / missing / version
    router = BundleRouter(bundle)                       # exported policy + encoder, tokenizer, pool
    router.action_names -> list[str]                    # pool models in action order, + "STOP" if enabled
    router.pool -> hrjax.pool.Pool
    router.offers() -> {served model name: cost_lambda} # e.g. {"hrjax-router": 0.05, "hrjax-router@cost=0.2": 0.5}
    router.lambda_for(model_name, budget=None) -> float # UnknownModelError / BudgetError (both BundleError)
    router.start(question) -> RouteState                # immutable; hop 0, cost 0
    router.warm_up(max_decisions) -> int                # compiles every encoder / policy batch shape first
    router.decide(states, lams) -> list[int]            # one packed encoder pass (`sentence_batches`), one policy
                                                        # call per parameter set the lambdas need; argmax
    router.probabilities(states, lams) -> [B, A]        # what decide takes the argmax of
    router.prompt(state, action) -> list[int]           # the pool model's prompt ids for this hop
    router.advance(state, action, generation, tokens_in=None) -> RouteState  # STOP -> finished; else the
                                                        # answer and its cost are appended, hop + 1
    router.sampling(max_tokens=None, temperature=0.0, stop=(), seed=None) -> SamplingParams
    router.route(questions, lam, sampling=None) -> list[RouteState]   # the synchronous driver
    state.finished, state.hops (Hop(model, text, tokens_in, tokens_out, cost, finish_reason)), state.actions,
    state.answer, state.total_cost, state.to_dict()

Lower level, for checks: `router.embed(texts) -> [N, D]`, `router.observe(states)` and
`router.log_probs(embedding, hop, cost_features, action_mask, lams) -> [B, A]`. A fixed-lambda router
serves the lambdas it was trained at (`router.trained_lambdas`: the run's own and the evaluation sweep's);
a lambda-conditioned one any lambda in `router.lambda_range`. States are immutable, so one router serves
many requests at once; `hops` and `actions` are tuples.
Shapes: B states, A actions (M models, + STOP), D the encoder's width, E the observation's (D per part of
the context view, `hrjax.env.mdp.CONTEXT_VIEWS`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from hrjax.env.mdp import (Context, action_mask, cost_features, cost_unit, embed_contexts, hop_cost, hop_prompt,
                           make_answer, observation_width)
from hrjax.generate.sampler import Generation, SamplingParams
from hrjax.models import sentence_batches
from hrjax.pool import FileDigests, Pool, load_model
from hrjax.serving.bundle import STOP, Bundle, BundleError, lambda_for_budget, offers, parse_model_name
from hrjax.shapes import pow2_bucket


@dataclasses.dataclass(frozen=True)
class Hop:
    """One answered hop of a route; cost normalised as in the env."""

    model: str
    text: str
    tokens_in: int
    tokens_out: int
    cost: float
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class RouteState:
    """s_t of one question: the context, the hops so far, the cumulative and last-hop cost (float32
    values, summed as the env sums them) and whether the route ended (after L hops, or STOP)."""

    context: Context
    hops: tuple[Hop, ...] = ()
    actions: tuple[int, ...] = ()  # every action taken, STOP included
    total_cost: float = 0.0
    last_cost: float = 0.0
    finished: bool = False
    stopped: bool = False

    @property
    def question(self) -> str:
        return self.context.question

    @property
    def answer(self) -> str:
        """The latest response (the route's answer once finished); '' before the first hop."""
        return self.hops[-1].text if self.hops else ""

    def to_dict(self) -> dict:
        """JSON-ready: the question, route (model per hop, then STOP if it stopped), hops, answer, cost."""
        return {"question": self.question, "route": [h.model for h in self.hops] + ([STOP] if self.stopped else []),
                "hops": [dataclasses.asdict(h) for h in self.hops], "answer": self.answer,
                "tokens_in": sum(h.tokens_in for h in self.hops), "tokens_out": sum(h.tokens_out for h in self.hops),
                "total_cost": self.total_cost, "finished": self.finished}


def _deserialize(path):
    return jax.export.deserialize(bytearray(path.read_bytes()))


def _load_params(path) -> dict:
    from safetensors.numpy import load_file

    return jax.device_put(load_file(str(path)))


class BundleRouter:
    """A bundle ready to route (see the module docstring). `pool`: an already loaded pool of the
    bundle's members (e.g. shared), else loaded from the manifest."""

    def __init__(self, bundle: Bundle, pool: Optional[Pool] = None):
        from transformers import AutoTokenizer

        manifest = bundle.manifest
        self.bundle, self.env = bundle, bundle.env_config()
        if pool is None:
            digests = FileDigests()
            pool = Pool([load_model(spec, digests) for spec in bundle.pool_specs()])
        names, expected = [m.spec.name for m in pool.models], [m["name"] for m in manifest["pool"]]
        if names != expected:
            raise BundleError(f"The pool given ({names}) is not the bundle's ({expected}): pass its models in order.")
        self.pool, self.action_names, self.served_name = pool, bundle.action_names, bundle.served_name
        self.num_models = len(pool)
        self.stop = self.num_models if self.env.stop_action else None
        self.cost_unit = cost_unit(pool.base_rates, self.env.reference_tokens)
        policy = manifest["policy"]
        self.conditioned, self.default_lambda = policy["conditioned"], float(policy["default_lambda"])
        self.lambda_range = tuple(policy["lambda_range"]) if policy["lambda_range"] else None
        self.trained_lambdas = [s["cost_lambda"] for s in policy["param_sets"]]
        self._param_sets = [_load_params(bundle.file(s["params"])) for s in policy["param_sets"]]
        self._policy = jax.jit(_deserialize(bundle.file(policy["exported"])).call)
        encoder = manifest["encoder"]
        self._encoder = jax.jit(_deserialize(bundle.file(encoder["exported"])).call)
        self._encoder_params = _load_params(bundle.file(encoder["params"]))
        self.encoder_settings = encoder
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle.file(encoder["tokenizer"])))
        self.calibration = bundle.calibration

    # ------------------------------------------------------------------------ trade-offs

    def offers(self) -> dict[str, float]:
        """Served model name -> cost_lambda: the bundle's own trade-off, and one name per calibrated
        cost budget (`<served>@cost=X`: the best quality whose mean cost on the selection prompts <= X)."""
        return offers(self.calibration, self.served_name, self.default_lambda)

    def lambda_for(self, model_name: str, budget: Optional[float] = None) -> float:
        """The cost_lambda a served model name asks for (`parse_model_name`); `budget`, a mean cost per
        query, overrides the name's trade-off. Raises UnknownModelError / BudgetError (BundleError)."""
        kind, value = parse_model_name(model_name, self.served_name)
        if budget is not None:
            kind, value = "cost", float(budget)
        if kind is None:
            return self.default_lambda
        if kind == "lambda":
            self._param_set(value)
            return value
        entry = lambda_for_budget(self.calibration, **{"cost" if kind == "cost" else "share": value})
        return float(entry["cost_lambda"])

    def _param_set(self, lam: float) -> int:
        """The index of the parameters that serve `lam`; BundleError if none does."""
        if self.conditioned:
            low, high = self.lambda_range
            if not low - 1e-9 <= lam <= high + 1e-9:
                raise BundleError(f"cost_lambda {lam:g} is outside the range the router was trained on "
                                  f"[{low:g}, {high:g}]: pick one inside it.")
            return 0
        for i, trained in enumerate(self.trained_lambdas):
            if abs(trained - lam) <= 1e-9 * max(1.0, abs(lam)):
                return i
        raise BundleError(f"No router in this bundle was trained at cost_lambda {lam:g}; it serves "
                          f"{sorted(self.trained_lambdas)} (or a cost budget: '{self.served_name}@cost=X').")

    # ------------------------------------------------------------------------ observations and decisions

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> [N, D] float32 unit vectors through the exported encoder, tokenised and packed as the
        training encoder does (`hrjax.models.sentence_batches`)."""
        cfg = self.encoder_settings
        if not texts:
            return np.zeros((0, cfg["dim"]), np.float32)
        ids = sentence_batches.tokenize(self.tokenizer, texts, cfg["do_lower_case"], cfg["max_seq_length"])
        return sentence_batches.embed_packed(
            ids, lambda input_ids, segment_ids: self._encoder(self._encoder_params, input_ids, segment_ids),
            cfg["dim"], cfg["batch_size"], cfg["pad_token_id"], cfg["max_seq_length"])

    def log_probs(self, embedding, hop, cost_feats, mask, lams) -> np.ndarray:
        """[B, A] the policy's log-probabilities (invalid actions excluded) for observations [B, ...]:
        one exported-policy call per parameter set the lambdas [B] need, each padded to a power of two."""
        embedding, hop = np.asarray(embedding, np.float32), np.asarray(hop, np.int32)
        cost_feats, mask = np.asarray(cost_feats, np.float32), np.asarray(mask, bool)
        lams = np.asarray(lams, np.float32).reshape(-1)
        out = np.zeros(mask.shape, np.float32)
        sets = np.array([self._param_set(float(lam)) for lam in lams], np.int64)
        for index in np.unique(sets):
            rows = np.flatnonzero(sets == index)
            pad = np.concatenate([rows, np.full(pow2_bucket(rows.size) - rows.size, rows[0])])
            result = self._policy(self._param_sets[index], embedding[pad], hop[pad], cost_feats[pad], lams[pad],
                                  mask[pad])
            out[rows] = np.asarray(result)[:rows.size]
        return out

    def warm_up(self, max_decisions: int) -> int:
        """Compiles, by running each once on padding, the exported encoder at every shape `embed` packs to
        and the policy at every power-of-two batch up to `max_decisions` rows, so that no request waits for
        a compilation; -> the number of shapes run. Each pool model's token table (its stop strings' bytes,
        about 1 s for 50k tokens) is read too; the pool models' programs compile on first use."""
        for model in self.pool.models:
            model.sampler.token_table  # noqa: B018 - a cached property: read here, not at the first request
        cfg = self.encoder_settings
        shapes = sentence_batches.packed_shapes(cfg["batch_size"], cfg["max_seq_length"])
        for rows, length in shapes:
            ids, segments = np.full((rows, length), cfg["pad_token_id"], np.int32), np.ones((rows, length), np.int32)
            jax.block_until_ready(self._encoder(self._encoder_params, ids, segments))
        batches = [2 ** i for i in range(pow2_bucket(max_decisions).bit_length())]
        width = observation_width(cfg["dim"], self.env.view)
        for rows in batches:
            mask = np.ones((rows, len(self.action_names)), bool)
            self.log_probs(np.zeros((rows, width), np.float32), np.zeros(rows, np.int32),
                           np.zeros((rows, 2), np.float32), mask, np.full(rows, self.default_lambda, np.float32))
        return len(shapes) + len(batches)

    def observe(self, states: Sequence[RouteState]):
        """-> (embedding [B, E], hop [B], cost features [B, 2], action mask [B, A]), as the env observes."""
        if any(s.finished for s in states):
            raise BundleError("A finished route has no decision left: pass only unfinished states.")
        hop = np.array([len(s.hops) for s in states], np.int32)
        return (embed_contexts(self.embed, [s.context for s in states], self.env.view), hop,
                cost_features(np.array([s.total_cost for s in states], np.float32),
                              np.array([s.last_cost for s in states], np.float32)),
                action_mask(hop, self.num_models, self.env.stop_action))

    def probabilities(self, states: Sequence[RouteState], lams: Sequence[float]) -> np.ndarray:
        """[B, A] action probabilities of unfinished `states`, each at its cost_lambda."""
        if len(lams) != len(states):
            raise ValueError(f"Give one cost_lambda per state: {len(states)} states, {len(lams)} lambdas.")
        if not states:
            return np.zeros((0, len(self.action_names)), np.float32)
        return np.exp(self.log_probs(*self.observe(states), lams))

    def decide(self, states: Sequence[RouteState], lams: Sequence[float]) -> list[int]:
        """The greedy action of each unfinished state: the argmax of the masked policy."""
        if len(lams) != len(states):
            raise ValueError(f"Give one cost_lambda per state: {len(states)} states, {len(lams)} lambdas.")
        if not states:
            return []
        return [int(a) for a in np.argmax(self.log_probs(*self.observe(states), lams), axis=-1)]

    # ------------------------------------------------------------------------ hops

    def start(self, question: str) -> RouteState:
        return RouteState(Context(str(question)))

    def prompt(self, state: RouteState, action: int) -> list[int]:
        """Pool model `action`'s prompt token ids for the next hop of `state` (the env's hop template)."""
        if state.finished or not 0 <= action < self.num_models:
            raise BundleError(f"No prompt for action {action} on a {'finished' if state.finished else 'live'} "
                              f"route: prompts are for pool models 0..{self.num_models - 1} of unfinished routes.")
        return hop_prompt(self.pool.models[action], self.env.template, state.context)

    def advance(self, state: RouteState, action: int, generation: Optional[Generation],
                tokens_in: Optional[int] = None) -> RouteState:
        """The state after `action`: STOP finishes the route (`generation` unused); a model appends
        `generation` as its answer (decoded with the bundle's stop strings when `generation.text` is
        None), pays base_rate * (tokens_in + tokens_out) / cost_unit and moves one hop on.
        `tokens_in`: the prompt's length, if known (else `prompt(state, action)` is measured)."""
        if state.finished:
            raise BundleError("The route already finished: start a new one.")
        if action == self.stop:
            if not state.hops:
                raise BundleError("STOP is not allowed at hop 0: the route has no answer to stop on.")
            return dataclasses.replace(state, actions=state.actions + (action,), last_cost=0.0, finished=True,
                                       stopped=True)
        model = self.pool.models[action]
        if generation.text is None:
            generation = model.sampler.with_text(generation, self.env.stop)
        tokens_in = len(self.prompt(state, action)) if tokens_in is None else int(tokens_in)
        tokens_out = len(generation.tokens)
        cost = hop_cost(model.spec.base_rate, tokens_in, tokens_out, self.cost_unit)
        hop = Hop(model.spec.name, generation.text, tokens_in, tokens_out, float(cost), generation.finish_reason)
        answer = make_answer(model, generation.tokens, generation.text, generation.finish_reason)
        hops = state.hops + (hop,)
        return dataclasses.replace(state, context=state.context.then(answer), hops=hops,
                                   actions=state.actions + (action,),
                                   total_cost=float(np.float32(state.total_cost) + cost), last_cost=float(cost),
                                   finished=len(hops) >= self.env.num_hops)

    def sampling(self, max_tokens: Optional[int] = None, temperature: float = 0.0, stop: Sequence[str] = (),
                 seed: Optional[int] = None) -> SamplingParams:
        """Decoding settings for the pool: the bundle's (max_new_tokens, stop strings; greedy) unless given;
        `stop` strings are added to the bundle's."""
        return SamplingParams(max_new_tokens=self.env.max_new_tokens if max_tokens is None else int(max_tokens),
                              temperature=float(temperature), stop=tuple(dict.fromkeys((*self.env.stop, *stop))),
                              seed=0 if seed is None else int(seed))

    def route(self, questions: Sequence[str], lam: float, sampling: Optional[SamplingParams] = None
              ) -> list[RouteState]:
        """Routes every question at `lam`: per hop one `decide` over the unfinished routes, then per chosen
        model one batched `generate_tokens` over its rows."""
        sampling = self.sampling() if sampling is None else sampling
        states = [self.start(q) for q in questions]
        for _ in range(self.env.num_hops):
            live = [i for i, s in enumerate(states) if not s.finished]
            if not live:
                break
            actions = self.decide([states[i] for i in live], [lam] * len(live))
            for action in sorted(set(actions)):
                rows = [i for i, a in zip(live, actions) if a == action]
                if action == self.stop:
                    states = _replaced(states, rows, [self.advance(states[i], action, None) for i in rows])
                    continue
                prompts = [self.prompt(states[i], action) for i in rows]
                sampler = self.pool.models[action].sampler
                generations = [sampler.with_text(g, sampling.stop) for g in sampler.generate_tokens(prompts, sampling)]
                states = _replaced(states, rows, [self.advance(states[i], action, g, len(p))
                                                  for i, g, p in zip(rows, generations, prompts)])
        return states


def _replaced(states: list, rows: Sequence[int], new: Sequence) -> list:
    out = list(states)
    for i, s in zip(rows, new):
        out[i] = s
    return out
