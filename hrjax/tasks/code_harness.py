"""The judge of `code_pass`: a test program's verdict on a completion, which the completion cannot forge.

`hrjax.tasks.scorers.code_pass` runs this file as the sandboxed program (`hrjax.tasks.sandbox.run_python`),
with {"nonce", "completion", "tests", "prompt"} as JSON on its stdin. Inside the sandbox, two processes:

    judge (this script) --requests--> completion's process: forked before the judge reads stdin;
          <--replies---               runs `completion` as `__main__`, then answers requests

- The judge runs `prompt` (the task's own text: its complete definitions, such as HumanEval/32's `poly`,
  serve the tests; its stubs, signature and docstring only, are the completion's to write), then `tests`,
  with its own builtins and standard library. The other globals the tests read are the completion's:
  plain data (None, bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset; a
  subclass's instance arrives as its base type, a standard module as the judge's own import) is copied;
  anything else is a `Remote`, whose calls, attribute reads, truth value, length and iteration are
  requests answered the same way. So every comparison, operation and assertion of the tests runs in the
  judge, on built-in values; the tests' code and expected values never enter the completion's process.
  The two are compiled apart: no text of the completion (an open string, a line continuation) can reach
  the tests.
- The verdict: only when the tests ran to their end does the judge write `f"{PASSED} {nonce}"` to
  stdout (the caller's 128-bit nonce, read by the judge alone) and exit 0; `code_pass` asks for both.
- The judge is not dumpable (prctl PR_SET_DUMPABLE 0): the completion's process, though of the same
  uid, can neither ptrace it nor open its /proc/<pid>/mem, fd/, environ. The completion's stdin is
  /dev/null. The judge ignores SIGINT; any other signal kills it, which is a failure.

Why each forgery fails:
- Exiting early (sys.exit, SystemExit, os._exit; at import or in a call), atexit, sys.excepthook,
  finalizers (__del__) at shutdown, a thread or a signal handler (SIGALRM) that exits: they end or
  change the completion's process only. Its exit status is not the verdict; the judge's tests fail.
- Printing the verdict line, writing it to every descriptor, patching print / sys.stdout / os.write /
  sys.exit: the line needs the nonce, which never enters the completion's process.
- Killing or signalling the judge: it dies without the line. The sandbox's init is root, out of reach.
- Patching builtins (abs, all) or modules (math.isclose), poisoning sys.modules, redefining the
  prompt's helpers: the tests use the judge's builtins, modules and prompt.
- A result whose __eq__, __sub__, __abs__ ... always agree: a non-plain result is a `Remote`, which
  compares by identity and has no arithmetic; its truth value, length and items, answered by the
  completion, are values it could have returned itself. A call raising StopIteration (which would end
  `all(map(...))` early) arrives as RuntimeError.
- sys.settrace / setprofile skipping assertions or rebinding `check`, reading the expected value from
  the caller's frame or code (sys._getframe, inspect, dis, gc), forking to try answers one by one: the
  tests' frames, constants and namespace are in the judge, which runs each test once.
- Reading the judge's memory or stdin through /proc: refused (not dumpable).

Residual risks: a kernel or sandbox escape. Under the sandbox's 'audit' fallback (no namespaces) ctypes
is refused, the judge stays dumpable (it says so on stderr), and a completion that reads or writes
/proc/<judge>/mem can forge the verdict. The tests still trust the answers they ask for: a right guess
passes, weak tests stay weak. What honest tests lose: arguments are copies (a test cannot hand the
completion a function or object of its own, nor see an argument changed in place), a plain global is
copied once before the tests run, two of the completion's objects compare by identity, and a subclass's
instance (namedtuple, Counter) comes back as its base type.
"""

from __future__ import annotations

import _ast  # the syntax tree's node classes; `ast` itself costs milliseconds of imports per program
import builtins
import json
import os
import signal
import sys

PASSED = "hrjax-code-pass"  # the verdict line: f"{PASSED} {nonce}"
_PR_SET_DUMPABLE = 4


# --- values across the pipes: JSON, with the non-JSON plain types tagged ------------------------------


def encode(value, other):
    """`value` as JSON data: None, bool, int, float, str and list as themselves; tuple, dict, set,
    frozenset, bytes (and bytearray), complex tagged; instances of their subclasses as the base type;
    anything else `other(value)`."""
    if value is None or value is True or value is False:
        return value
    for base in (int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, list):
        return [encode(v, other) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, other), encode(v, other)] for k, v in value.items()]}
    for base in (tuple, frozenset, set):
        if isinstance(value, base):
            return {base.__name__: [encode(v, other) for v in value]}
    return other(value)


_COLLECTIONS = {"tuple": tuple, "set": set, "frozenset": frozenset}


def decode(data, tagged):
    """The value `encode` made `data` from: built-in types only; tags other than the plain types'
    go to `tagged(tag, value)`. Malformed data raises."""
    if isinstance(data, list):
        return [decode(d, tagged) for d in data]
    if not isinstance(data, dict):
        return data
    ((tag, value),) = data.items()
    if tag in _COLLECTIONS:
        return _COLLECTIONS[tag](decode(v, tagged) for v in value)
    if tag == "dict":
        return {decode(k, tagged): decode(v, tagged) for k, v in value}
    if tag == "bytes":
        return bytes.fromhex(value)
    if tag == "complex":
        return complex(*value)
    return tagged(tag, value)


# --- the completion's process ------------------------------------------------------------------------


def serve(requests: int, replies: int) -> None:
    """Runs the completion as `__main__` on the first request, then answers requests until EOF:
    ["load", source] | ["names", [name]] | ["call", id, args, kwargs] | ["getattr", id, name] |
    ["unary", id, "bool" | "len" | "iter" | "next"] -> ["ok", value] | ["raise", builtin exception, message].
    Objects that are not plain data go out as {"remote": id} (modules as {"module": name})."""
    import types

    objects: list = []
    module = types.ModuleType("__main__")

    def reference(value):
        if isinstance(value, types.ModuleType) and value.__name__.partition(".")[0] in sys.stdlib_module_names:
            return {"module": value.__name__}
        objects.append(value)
        return {"remote": len(objects) - 1}

    def load(source):
        sys.modules["__main__"] = module
        exec(compile(source, "program.py", "exec"), vars(module))

    handlers = {
        "load": load,
        "names": lambda names: {n: vars(module)[n] for n in names if n in vars(module)},
        "call": lambda i, args, kwargs: objects[i](*args, **kwargs),
        "getattr": lambda i, name: getattr(objects[i], name),
        "unary": lambda i, what: {"bool": bool, "len": len, "iter": iter, "next": next}[what](objects[i]),
    }
    with open(requests, "rb") as incoming, open(replies, "w") as outgoing:
        for line in incoming:
            op, *args = decode(json.loads(line), lambda tag, i: objects[i])
            try:
                reply = ["ok", encode(handlers[op](*args), reference)]
            except BaseException as e:  # SystemExit and KeyboardInterrupt too: the judge decides
                base = next(c for c in type(e).__mro__ if getattr(builtins, c.__name__, None) is c)
                reply = ["raise", base.__name__, str(e)]
            for stream in (sys.stdout, sys.stderr):  # the completion's output before the judge's line
                try:
                    stream.flush()
                except Exception:
                    pass
            outgoing.write(json.dumps(reply) + "\n")
            outgoing.flush()


# --- the judge ---------------------------------------------------------------------------------------


class Remote:
    """An object of the completion's process, by reference. Calls, attribute reads (public names),
    truth value, len() and iteration are requests; comparisons are by identity, there is no arithmetic."""

    __slots__ = ("_id",)

    def __init__(self, id_: int):
        if type(id_) is not int:
            raise ValueError(f"bad remote id {id_!r}")
        self._id = id_

    def __call__(self, *args, **kwargs):
        return _ask("call", self._id, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return _ask("getattr", self._id, name)

    def __bool__(self) -> bool:
        return _typed(_ask("unary", self._id, "bool"), bool)

    def __len__(self) -> int:
        return _typed(_ask("unary", self._id, "len"), int)

    def __iter__(self):
        return _typed(_ask("unary", self._id, "iter"), Remote)

    def __next__(self):
        return _ask("unary", self._id, "next")

    def __repr__(self) -> str:
        return f"<completion object #{self._id}>"


def _typed(value, kind):
    if type(value) is not kind:
        raise TypeError(f"the completion answered {type(value).__name__}, not {kind.__name__}")
    return value


def _to_completion(value):
    if isinstance(value, Remote):
        return {"remote": value._id}
    raise TypeError(f"cannot pass a {type(value).__name__} to the completion: only plain data and its own objects")


def _from_completion(tag: str, value):
    if tag == "remote":
        return Remote(value)
    if tag == "module" and isinstance(value, str) and value.partition(".")[0] in sys.stdlib_module_names:
        import importlib

        return importlib.import_module(value)
    raise ValueError(f"the completion sent an unknown value: {tag!r}")


_channel = None  # (requests writer, replies reader), set by `judge`


def _ask(op: str, *args):
    """One request to the completion's process; its answer as a value, or its exception raised here."""
    _send(op, *args)
    return _answer(stop_iteration=args[1:] == ("next",))


def _send(op: str, *args) -> None:
    out = _channel[0]
    out.write(json.dumps(encode([op, *args], _to_completion)) + "\n")
    out.flush()


def _answer(stop_iteration: bool = False):
    """The next reply: a value, or the completion's exception raised here as the built-in one it derives
    from (RuntimeError for one that is not an Exception, and for StopIteration unless `stop_iteration`)."""
    line = _channel[1].readline()
    if not line:
        raise RuntimeError("the completion's process ended")
    status, *answer = json.loads(line)
    if status == "ok":
        return decode(answer[0], _from_completion)
    name, message = answer
    error = getattr(builtins, name, None) if isinstance(name, str) else None
    if not (isinstance(error, type) and issubclass(error, Exception)) or (
            issubclass(error, (StopIteration, StopAsyncIteration)) and not stop_iteration):
        error = RuntimeError
        message = f"the completion raised {name}: {message}"
    raise error(message)


def _global_names(code) -> set[str]:
    """Every name `code` and the code nested in it may read as a global (attribute names too)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


def _stubs(tree) -> list[str]:
    """The functions of a module's syntax tree with nothing but a docstring (imports, pass, ...) in
    their body."""

    def filler(statement) -> bool:
        return isinstance(statement, (_ast.Pass, _ast.Import, _ast.ImportFrom)) or (
            isinstance(statement, _ast.Expr) and isinstance(statement.value, _ast.Constant))

    return [node.name for node in tree.body
            if isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef)) and all(map(filler, node.body))]


def _undumpable() -> None:
    """PR_SET_DUMPABLE 0: processes of our uid can no longer ptrace us or open /proc/<our pid>/*."""
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            return
        error = OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (ImportError, OSError) as e:  # the sandbox's 'audit' fallback refuses ctypes
        error = e
    print(f"hrjax judge: stays dumpable ({error}); the completion can read its memory", file=sys.stderr)


def judge() -> None:
    """Forks the completion's process, reads the payload, runs the tests; writes the verdict line only
    if they ran to their end. Never returns."""
    global _channel
    _undumpable()
    sys.set_int_max_str_digits(0)  # integers of any size cross the pipes
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    completion = os.fork()
    if completion == 0:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # before any of the completion's code runs
        os.close(null)
        os.close(requests_w)
        os.close(replies_r)
        serve(requests_r, replies_w)
        os._exit(0)
    os.close(requests_r)
    os.close(replies_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the completion may signal us: no KeyboardInterrupt to catch
    with open(0, "rb") as stdin:
        payload = json.loads(stdin.read())
    nonce = payload["nonce"]
    _channel = (open(requests_w, "w"), open(replies_r, "rb"))
    _send("load", payload["completion"])  # it loads while we read the tests and run the prompt
    tests = compile(payload["tests"], "tests.py", "exec")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if payload["prompt"]:
        prompt = compile(payload["prompt"], "prompt.py", "exec", _ast.PyCF_ONLY_AST)
        exec(compile(prompt, "prompt.py", "exec"), namespace)
        for stub in _stubs(prompt):
            namespace.pop(stub, None)
    _answer()
    wanted = sorted(n for n in _global_names(tests) if n not in namespace and not hasattr(builtins, n))
    namespace.update((n, v) for n, v in _typed(_ask("names", wanted), dict).items() if n in wanted)
    exec(tests, namespace)
    os.kill(completion, signal.SIGKILL)
    os.waitpid(completion, 0)
    sys.stdout.flush()
    os.write(1, f"\n{PASSED} {nonce}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    try:
        judge()
    except BaseException as e:
        sys.stdout.flush()
        sys.__excepthook__(type(e), e, e.__traceback__)  # the C traceback printer: no `traceback` import
        sys.stderr.flush()
        os._exit(1)
