"""`hrjax serve` on the reduced specialist world's bundle (the shared `reduced_quickstart` run, exported):
one real server process (`python -m hrjax.cli serve`, loopback, free port) for the module, called with the
official `openai` client for answers and with raw HTTP for bad requests. Routed answers equal the bundle
router's own `route`; streaming works; paren questions are answered via paren -> mul; every bad request gets
a 4xx OpenAI-style error and the server keeps serving, also after a client leaves mid-stream; serving never
imports the training code."""

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hrjax.benchmarks.serve import free_port  # noqa: E402

API_KEY = "test-key"
MAX_PROMPT_CHARS, MAX_TOKENS, MAX_REQUEST_BYTES = 64, 32, 4096
FORBIDDEN = ("hrjax.agent", "hrjax.train", "hrjax.models.encoder", "orbax")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


# `hrjax serve` run by the real CLI; when it exits it writes which forbidden modules it ever imported
SERVE = textwrap.dedent(f"""
    import json, sys
    from hrjax.cli import main

    code = main(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] == "orbax" or m.startswith({FORBIDDEN[:3]!r})), f)
    sys.exit(code)
""")


class ServerProcess:
    """A running `hrjax serve` on a free loopback port."""

    def __init__(self, bundle, workdir):
        self.log, self.imported = workdir / "server.log", workdir / "imported.json"
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVE, str(self.imported), "serve", f"--bundle={bundle}", f"--port={port}",
                 f"--api_key={API_KEY}", f"--max_prompt_chars={MAX_PROMPT_CHARS}", f"--max_tokens={MAX_TOKENS}",
                 f"--max_request_bytes={MAX_REQUEST_BYTES}", "--no-warmup"],  # warm-up: tests/test_export.py
                stdout=out, stderr=subprocess.STDOUT)

    def wait_until_up(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not come up: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)

    def stop(self) -> int:
        """Stops the server as Ctrl-C does (SIGINT: uvicorn's graceful shutdown) -> its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_process(quickstart_bundle, tmp_path_factory):
    server = ServerProcess(quickstart_bundle, tmp_path_factory.mktemp("serve_run"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(server_process, expected):
    """The base URL of the running server (auth on, small limits); it boots while `expected` is computed."""
    server_process.wait_until_up()
    return server_process.url


@pytest.fixture(scope="module")
def router(quickstart_bundle):
    from hrjax.serving.bundle import load_bundle
    from hrjax.serving.router import BundleRouter

    return BundleRouter(load_bundle(quickstart_bundle))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _questions(task_type: str, n: int = 8) -> list[str]:
    """The first n test questions of a task type (the first n of a longer list: item i depends on i only)."""
    from hrjax.tasks.specialist_world import specialist_examples

    return [e.question for e in specialist_examples("test", n, task_types=(task_type,))]


@pytest.fixture(scope="module")
def expected(router) -> dict:
    """question -> the bundle router's own route at the default trade-off, for every question the tests send
    (one `route` call: the reference compiles few shapes)."""
    questions = _questions("add") + _questions("paren", 32) + ["12+30"]
    return dict(zip(questions, router.route(questions, router.lambda_for("hrjax-router"))))


def _route_of(choice) -> list[str]:
    return choice.model_extra["hrjax"]["route"]


def test_routed_answers_equal_the_bundle_routers(server, client, router, expected):
    questions = _questions("add") + _questions("paren")
    assert [m.id for m in client.models.list().data] == list(router.offers())

    def ask(question):
        return client.chat.completions.create(model="hrjax-router", messages=[{"role": "user", "content": question}])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: answers from batched calls
        answers = list(pool.map(ask, questions))
    for response, state in zip(answers, [expected[q] for q in questions]):
        choice = response.choices[0]
        assert choice.message.content == state.answer, (state.question, choice.message.content, state.answer)
        assert _route_of(choice) == [hop.model for hop in state.hops]
        assert choice.model_extra["hrjax"]["total_cost"] == pytest.approx(state.total_cost)
        assert response.usage.prompt_tokens == sum(hop.tokens_in for hop in state.hops)
        assert response.usage.completion_tokens == sum(hop.tokens_out for hop in state.hops)

    # another trade-off, by model name and by the body's cost budget: the same lambda and routes
    name = next(n for n, lam in router.offers().items() if lam != router.lambda_for("hrjax-router"))
    lam = router.lambda_for(name)
    other = router.route(questions, lam)
    by_name = client.completions.create(model=name, prompt=questions)
    by_budget = client.completions.create(model="hrjax-router", prompt=questions,
                                          extra_body={"hrjax": {"cost_budget": float(name.split("=")[1])}})
    for response in (by_name, by_budget):
        assert response.model_extra["hrjax"]["cost_lambda"] == pytest.approx(lam)
        choices = sorted(response.choices, key=lambda c: c.index)
        assert [c.text for c in choices] == [s.answer for s in other]
        assert [_route_of(c) for c in choices] == [[hop.model for hop in s.hops] for s in other]
    metrics = httpx.get(f"{server}/metrics", headers=AUTH, timeout=10).text
    hits = re.findall(r'hrjax_prompt_cache_hits_total\{model="\w+"\} (\d+)', metrics)
    assert sum(map(int, hits)) > 0, metrics  # the questions asked again: their hop prompts were not prefilled


def test_streaming_sends_the_routed_answer(client, expected):
    questions = _questions("paren", 2)
    states = [expected[q] for q in questions]
    chunks = list(client.chat.completions.create(model="hrjax-router", stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": questions[0]}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == states[0].answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == sum(hop.tokens_out for hop in states[0].hops)

    text = {}
    for chunk in client.completions.create(model="hrjax-router", prompt=questions, stream=True):
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + choice.text
    assert [text[i] for i in range(len(questions))] == [s.answer for s in states]


def test_paren_questions_are_answered_via_paren_then_mul(client, reduced_quickstart):
    from hrjax.tasks.specialist_world import specialist_examples

    examples = specialist_examples("test", 16, task_types=("paren",))
    response = client.completions.create(model="hrjax-router", prompt=[e.question for e in examples])
    choices = sorted(response.choices, key=lambda c: c.index)
    routes = [_route_of(c) for c in choices]
    assert sum(r == ["paren", "mul"] for r in routes) >= 0.9 * len(examples), routes
    correct = [c.text == e.answers[0] for c, e in zip(choices, examples)]
    # about as often as the trained router on the held-out paren prompts, within 3 of the 16: the pool's own
    # accuracy depends on the host's kernels (0.78 on an AVX2 host, where the oracle reaches no higher; 12 of
    # these 16 served right there). A router that does not compose paren -> mul answers none.
    trained = reduced_quickstart[1].summary["methods"]["router"]["paren"]["quality"]["mean"]
    assert sum(correct) >= (trained - 0.2) * len(examples), [(e.question, c.text) for c, e in zip(choices, examples)]
    for choice, route in zip(choices, routes):  # the answer is the last hop's (mul's) response
        assert choice.text == choice.model_extra["hrjax"]["hops"][-1]["text"]


def _chat(content="2+3", **fields) -> dict:
    return {"model": "hrjax-router", "messages": [{"role": "user", "content": content}], **fields}


# name -> (path, body (dict: JSON-encoded; bytes: sent as is), headers, expected status)
BAD_REQUESTS = {
    "malformed JSON": (CHAT, b'{"model": "hrjax-router", "messages": [', AUTH, 400),
    "body not an object": (CHAT, b"[1, 2]", AUTH, 400),
    "unknown model": (CHAT, {**_chat(), "model": "gpt-4"}, AUTH, 404),
    "unknown trade-off": (CHAT, {**_chat(), "model": "hrjax-router@speed=3"}, AUTH, 404),
    "empty prompt": (CHAT, _chat(""), AUTH, 400),
    "empty completion prompt": (COMPLETIONS, {"model": "hrjax-router", "prompt": "  "}, AUTH, 400),
    "prompt over the character limit": (CHAT, _chat("1+" * MAX_PROMPT_CHARS + "1"), AUTH, 400),
    "prompt over the model context": (CHAT, _chat("1+" * 25 + "1", max_tokens=MAX_TOKENS), AUTH, 400),
    "negative max_tokens": (CHAT, _chat(max_tokens=-1), AUTH, 400),
    "zero max_tokens": (COMPLETIONS, {"model": "hrjax-router", "prompt": "2+3", "max_tokens": 0}, AUTH, 400),
    "huge max_tokens": (CHAT, _chat(max_tokens=10**9), AUTH, 400),
    "wrong token": (CHAT, _chat(), {"Authorization": "Bearer nope"}, 401),
    "no token": (CHAT, _chat(), {}, 401),
    "max_tokens a string": (CHAT, _chat(max_tokens="5"), AUTH, 400),
    "temperature a string": (CHAT, _chat(temperature="hot"), AUTH, 400),
    "messages a string": (CHAT, {"model": "hrjax-router", "messages": "2+3"}, AUTH, 400),
    "stream a string": (CHAT, _chat(stream="yes"), AUTH, 400),
    "cost_budget a string": (CHAT, _chat(hrjax={"cost_budget": "cheap"}), AUTH, 400),
    "stop a number": (COMPLETIONS, {"model": "hrjax-router", "prompt": "2+3", "stop": 7}, AUTH, 400),
    "two user messages": (CHAT, {**_chat(), "messages": [{"role": "user", "content": "1+1"}] * 2}, AUTH, 400),
    "n > 1": (CHAT, _chat(n=2), AUTH, 400),
    "body over the size limit": (CHAT, _chat(user="x" * MAX_REQUEST_BYTES), AUTH, 413),
    "unknown path": ("/v1/engines", _chat(), AUTH, 404),
}


@pytest.fixture(scope="module")
def good_request(expected) -> tuple[dict, str]:
    """A request and the answer the bundle's router gives it."""
    return _chat("12+30"), expected["12+30"].answer


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, good_request, case):
    path, body, headers, status = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{path}", content=content, timeout=60,
                          headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}, error
    request, answer = good_request
    good = httpx.post(f"{server}{CHAT}", json=request, headers=AUTH, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == answer, good.text


def test_a_client_leaving_mid_stream_leaves_the_server_healthy(server, client, expected, good_request):
    """The stream's route waits behind a batch of other routes when its client hangs up."""
    busy_questions = _questions("paren", 32)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.completions.create, model="hrjax-router", prompt=busy_questions)
        time.sleep(0.05)
        with httpx.stream("POST", f"{server}{CHAT}", json={**_chat("(3+4)*5"), "stream": True}, headers=AUTH,
                          timeout=60) as response:
            assert response.status_code == 200
            assert '"role": "assistant"' in next(response.iter_lines())  # then hang up mid-route
        answers = [c.text for c in sorted(busy.result().choices, key=lambda c: c.index)]
        assert answers == [expected[q].answer for q in busy_questions]
    deadline = time.monotonic() + 60
    while (health := httpx.get(f"{server}/health", timeout=10).json())["in_flight"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["status"] == "ok"
    request, answer = good_request
    assert client.chat.completions.create(**request).choices[0].message.content == answer
    metrics = httpx.get(f"{server}/metrics", headers=AUTH, timeout=10).text
    assert f'hrjax_requests_total{{endpoint="{CHAT}",status="499"}} 1' in metrics, metrics
    assert 'hrjax_routes_total{route="paren>mul"}' in metrics and "hrjax_request_latency_seconds_bucket" in metrics


@pytest.mark.parametrize("flag", ["--prompt_cache=-1", "--max_batch=0", "--batch_window_ms=-1"])
def test_bad_batching_flags_exit_naming_them(flag, capsys):
    from hrjax.serving.server import main

    with pytest.raises(SystemExit) as exit_info:
        main(["hrjax serve", "--bundle=unused", "--compilation_cache=", flag])
    assert exit_info.value.code == 2 and "Fix the flag:" in capsys.readouterr().err


def test_serving_never_imports_the_training_code(server, server_process):
    """Last in the module: stops the server, which then lists the forbidden modules it ever imported after
    loading the bundle and answering every request above (a fresh process when run alone)."""
    httpx.post(f"{server}{CHAT}", json=_chat("12+30"), headers=AUTH, timeout=60).raise_for_status()
    assert server_process.stop() == 0, server_process.log.read_text()[-3000:]
    assert json.loads(server_process.imported.read_text()) == []
