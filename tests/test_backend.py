"""--backend: a real engine (llama-cpp-python's OpenAI-style server) on 127.0.0.1, and a stub engine
for what a real one cannot be made to do on cue: stream slowly, hang, break, talk nonsense."""

import http.server
import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import tabby_reference as tabby
from conftest import (
    ROOT,
    complete,
    free_port,
    read_events,
    start_engine,
    start_server,
    stop,
    wait_for_health,
)

import app as server


@pytest.fixture(scope="module")
def engine(model_path, tmp_path_factory):
    """URL of llama-cpp-python's server on the tiny StarCoder model, named so that its template is known."""
    proc, url = start_engine(
        model_path("starcoder"), "tiny-starcoder", tmp_path_factory.mktemp("engine")
    )
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def backend_app(tmp_path):
    """backend_app(url, **config) -> a Flask test client of a server in front of that engine."""

    def make(url, **overrides):
        config = server.load_config(
            ["--backend", url, "--root", str(tmp_path / "tabby")], environ={}
        )
        config.update(overrides)
        app = server.create_app(config)
        app.config["TESTING"] = True
        return app.test_client()

    return make


REQUESTS = [
    ("def f(a, b):\n    ", "\n", {}),  # a block: ends at the blank line before "class"
    ("def f(a, b):\n    total", "\n", {}),  # code on the cursor line: it goes after <fim_middle>
    ("x = 1\r\ndef f(a, b):\r\n    ", "\r\n", {}),
    ("def f(a, b):\n    ", "\n", {"language": "rust"}),
    (
        "def f(a, b):\n    ",
        "\n",
        {"segments": {"declarations": [{"filepath": "calc.py", "body": "class Calc:\n  pass"}]}},
    ),
    (
        "",
        "",
        {
            "debug_options": {
                "raw_prompt": "<fim_prefix>def f(a, b):\n    <fim_suffix>\n<fim_middle>"
            }
        },
    ),
]


def ask(client, prefix, suffix, extra):
    segments = {"prefix": prefix, "suffix": suffix, **extra.get("segments", {})}
    body = {
        "language": extra.get("language", "python"),
        "segments": segments,
        "temperature": 0,
        "debug_options": {"return_prompt": True, **extra.get("debug_options", {})},
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["choices"][0]["text"], r.get_json()["debug_data"]["prompt"]


def test_an_engine_gives_the_same_completions_as_the_local_model(engine, backend_app, make_app):
    remote, local = backend_app(engine + "/v1"), make_app("starcoder")[0].test_client()
    answers = [ask(remote, *request) for request in REQUESTS]
    assert answers == [ask(local, *request) for request in REQUESTS]
    assert (
        answers[0][0] == "total = a + b\n    return total"
        and answers[2][0] == "total = a + b\r\n    return total"
    )
    assert answers[1][1].endswith("<fim_middle>    total")


def test_the_model_name_comes_from_the_engine_and_health_says_it_answers(engine, backend_app):
    client = backend_app(engine, backend_kind="openai")
    health = client.get("/v1/health").get_json()
    assert health["model"] == "tiny-starcoder" and health["device"] == "remote"
    assert health["backend"] == {"kind": "openai", "url": engine, "answers": True}


def test_user_code_that_looks_like_special_tokens_stays_text(engine, backend_app):
    client = backend_app(engine + "/v1")
    prefix = "s = '<fim_middle><|endoftext|>'\ndef f(a, b):\n    "
    text, prompt = ask(client, prefix, "\n", {})
    assert prompt.count("<fim_middle>") == 1 and prompt.endswith(
        "<fim_middle>"
    )  # the template's only
    assert (
        "<\u200bfim_middle>" in prompt
        and "<\u200b|endoftext|>" in prompt
        and "<|endoftext|>" not in prompt
    )
    assert text == "total = a + b\n    return total"


@pytest.mark.parametrize(
    "url, kind, base",
    [
        ("http://h:8080/completion", "llama.cpp", "http://h:8080"),
        ("http://h:8000/v1", "openai", "http://h:8000"),
        ("http://h:8000/v1/", "openai", "http://h:8000"),
        ("https://h/proxy/v1/completions", "openai", "https://h/proxy"),
        ("http://h:11434/api/generate", "ollama", "http://h:11434"),
    ],
)
def test_the_kind_of_engine_is_told_by_the_url(url, kind, base):
    told, _, told_base = server.engine_of(server.load_config(["--backend", url], environ={}))
    assert (told, told_base) == (kind, base)
    config = server.load_config(["--backend", base, "--backend-kind", kind], environ={})
    assert server.engine_of(config)[2] == base


# -----------------------------------------------------------------------------
# A stub engine: llama-server's stream, or Ollama's, piece by piece, as its mode says.


def peer_gone(sock):
    readable, _, _ = select.select([sock], [], [], 0)
    try:
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Stub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.reply(
            200,
            {"/v1/models": {"data": [{"id": "stub-starcoder"}]}}.get(self.path, {"status": "ok"}),
        )

    def do_POST(self):
        stub = self.server
        stub.requests.append(
            (
                self.path,
                dict(self.headers),
                json.loads(self.rfile.read(int(self.headers["Content-Length"]))),
            )
        )
        mode = stub.modes.pop(0) if len(stub.modes) > 1 else stub.modes[0]
        if mode in (500, 503):
            return self.reply(mode, {"error": {"message": "the stub says no", "code": mode}})
        if mode == "not http":
            return self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        if mode == "hang":  # evaluating a long prompt, or stuck
            return self.wait_for_hang_up(start=time.monotonic())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "garbage":
            return self.wfile.write(b"<html>hello</html>\n")
        for i, piece in enumerate(stub.pieces):
            if mode == "hang after one" and i == 1:
                return self.wait_for_hang_up(start=time.monotonic())
            if peer_gone(self.connection):
                stub.gone_after = i
                return
            if self.path == "/v1/chat/completions":
                event = {
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]
                }
            else:
                event = (
                    {"response": piece, "done": False}
                    if mode == "ollama"
                    else {"content": piece, "stop": False}
                )
            self.wfile.write(
                (
                    json.dumps(event) if mode == "ollama" else "data: " + json.dumps(event) + "\n"
                ).encode()
                + b"\n"
            )
            self.wfile.flush()
            stub.sent.append(time.monotonic())
            time.sleep(stub.delay)
        if mode != "cut" and self.path == "/v1/chat/completions":
            self.wfile.write(
                b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
            )
        elif mode != "cut":  # the last event; a cut stream just ends
            self.wfile.write(
                b'{"response": "", "done": true}\n'
                if mode == "ollama"
                else b'data: {"content": "", "stop": true}\n\n'
            )

    def wait_for_hang_up(self, start):
        while time.monotonic() - start < 5 and not peer_gone(self.connection):
            time.sleep(0.005)
        self.server.hung_up = time.monotonic()

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    """A stub llama-server on 127.0.0.1; set .modes (the last one stays), .pieces and .delay."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    httpd.daemon_threads = True
    httpd.modes, httpd.pieces, httpd.delay = ["stream"], ["x", " = 1"], 0.0
    httpd.requests, httpd.sent, httpd.gone_after, httpd.hung_up = [], [], None, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def error_of(client, status, **body):
    t = time.monotonic()
    r = client.post(
        "/v1/completions",
        json={
            "language": "python",
            "segments": {"prefix": "def f():\n    ", "suffix": "\n"},
            **body,
        },
    )
    assert r.status_code == status and r.is_json, r.get_data(as_text=True)
    return r.get_json()["error"], time.monotonic() - t


def test_what_a_llama_server_gets(stub, backend_app):
    client = backend_app(stub.url + "/completion", backend_token="s3cret", max_tokens=5)
    assert complete(client, "def f():\n    ", "\n", seed=7, temperature=0.5) == "x = 1"
    path, headers, body = stub.requests[-1]
    assert path == "/completion" and headers["Authorization"] == "Bearer s3cret"
    assert body["prompt"] == "<fim_prefix>def f():\n    <fim_suffix>\n<fim_middle>"
    assert (
        body["n_predict"],
        body["seed"],
        body["temperature"],
        body["stream"],
        body["cache_prompt"],
    ) == (5, 7, 0.5, True, True)
    assert "stop" not in body  # we stop it: an engine holds back text that may begin a stop word


def test_what_ollama_gets(stub, backend_app):
    stub.modes = ["ollama"]
    client = backend_app(
        stub.url + "/api/generate", backend_model="qwen2.5-coder:1.5b-base", max_tokens=5
    )
    assert complete(client, "def f():\n    ", "\n") == "x = 1"
    path, _, body = stub.requests[-1]
    assert (
        path == "/api/generate"
        and body["model"] == "qwen2.5-coder:1.5b-base"
        and body["raw"] is True
    )
    assert body["prompt"] == "<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>"
    assert body["options"]["num_predict"] == 5 and "stop" not in body["options"]


def test_the_engine_connection_is_dropped_at_the_stop_word(stub, backend_app):
    stub.pieces, stub.delay = ["x = 1", "\n", "    y = 2", "\n\n", "z"] + ["z"] * 100, 0.03
    client = backend_app(stub.url + "/completion")
    assert complete(client, "def f():\n    ", "\n") == "x = 1\n    y = 2"
    deadline = time.monotonic() + 5
    while stub.gone_after is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (
        stub.gone_after is not None and stub.gone_after <= 5
    )  # the next piece after "\n\n" finds it gone


def test_the_time_budget_ends_an_engines_answer_at_a_line_end_and_it_is_not_kept(
    stub, backend_app, tmp_path
):
    """--time-budget 375 against an engine that sends a piece every 0.25 s: the budget is spent
    during the second line, which ends the answer; such an answer is not kept, so the same
    request goes to the engine again."""
    stub.pieces, stub.delay = ["x = 1", "\n    y", " = 2", "\n    z = 3", "\n    w = 4"], 0.25
    client = backend_app(stub.url + "/completion", time_budget=375)
    for _ in range(2):
        assert complete(client, "def f():\n    ", "\n") == "x = 1\n    y = 2"
    reasons = [
        e["event"]["completion"]["finish_reason"]
        for e in read_events(tmp_path / "tabby" / "events")
    ]
    assert reasons == ["time", "time"] and len(stub.requests) == 2


@pytest.fixture
def served(stub, tmp_path):
    """A server process in front of the stub (only Werkzeug's server shows us a hang-up)."""
    proc, url = start_server(
        [
            "--backend",
            stub.url + "/completion",
            "--root",
            str(tmp_path),
            "--time-budget",
            "0",
            "--max-tokens",
            "1000",
        ]
    )
    yield int(url.rsplit(":", 1)[1])
    stop(proc)


def post_then_hang_up(port, after):
    body = json.dumps(
        {"language": "css", "segments": {"prefix": "body {\n", "suffix": "\n"}}
    ).encode()
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    time.sleep(after)
    conn.close()  # as tabby-agent does when the user types on
    return time.monotonic()


def test_a_client_hang_up_drops_the_engine_connection_within_a_few_pieces(stub, served):
    stub.pieces, stub.delay = ["a"] * 500, 0.02
    closed = post_then_hang_up(served, 0.4)
    sent_then = sum(t <= closed for t in stub.sent)
    deadline = time.monotonic() + 5
    while stub.gone_after is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent_then >= 5 and stub.gone_after is not None and stub.gone_after - sent_then <= 3, (
        sent_then,
        stub.gone_after,
    )


def test_a_client_hang_up_while_the_engine_thinks_drops_it_too(stub, served):
    stub.modes = ["hang"]
    closed = post_then_hang_up(served, 0.3)
    deadline = time.monotonic() + 5
    while stub.hung_up is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stub.hung_up is not None and stub.hung_up - closed < 0.3


def test_an_engine_that_is_down_gets_a_502_after_a_few_quick_tries(backend_app):
    client = backend_app(
        f"http://127.0.0.1:{free_port()}/completion", backend_model="starcoder2-3b"
    )
    error, took = error_of(client, 502)
    assert "cannot reach it" in error and 0.3 <= took < 1, took  # three tries, 0.1 and 0.2 s apart


@pytest.mark.parametrize(
    "modes, status, words, seconds",
    [
        (["hang"], 504, "did not answer within 0.5 s", 0.5),  # --backend-timeout 0.5
        (["hang after one"], 504, "sent nothing for 0.5 s", 0.5),
        ([500], 502, "answered 500: the stub says no", 0),
        ([503], 502, "503: the stub says no", 0.3),  # three tries, 0.1 and 0.2 s apart
        (["garbage"], 502, "not a llama.cpp stream: '<html>hello</html>'", 0),
        (["not http"], 502, "engine at http://127.0.0.1", 0),
        (["cut"], 502, "ended its stream before it finished", 0),
    ],
)
def test_engine_failures_get_a_clear_error_and_the_server_keeps_serving(
    stub, backend_app, modes, status, words, seconds
):
    stub.modes = modes
    client = backend_app(stub.url + "/completion", backend_timeout=0.5)
    error, took = error_of(client, status)
    assert words in error and seconds <= took < seconds + 0.5, took
    assert len(stub.requests) == (
        3 if modes == [503] else 1
    )  # busy: tried again, a bounded number of times
    stub.modes = ["stream"]
    assert complete(client, "def f():\n    ", "\n") == "x = 1"
    assert client.get("/v1/health").get_json()["backend"]["answers"]


def test_a_busy_engine_is_tried_again(stub, backend_app):
    stub.modes = [503, 503, "stream"]
    client = backend_app(stub.url + "/completion")
    assert complete(client, "def f():\n    ", "\n") == "x = 1" and len(stub.requests) == 3


def test_health_says_when_the_engine_does_not_answer(backend_app, stub):
    client = backend_app(stub.url + "/completion")
    stub.shutdown()
    stub.server_close()
    r = client.get("/v1/health")
    assert (
        r.status_code == 200
        and r.get_json()["backend"]["answers"] is False
        and r.get_json()["backend"]["error"]
    )


# -----------------------------------------------------------------------------
# Start-up


def run(args, env=None):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TABBYPY_")}, **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "app.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--backend", "gpu-box:8080"], "not an http:// or https:// URL"),
        (["--backend", "http://gpu-box:80a/v1"], "not an http:// or https:// URL"),
        (["--backend", "http://h:8080"], "--backend-kind"),
        (["--backend", "http://h:8080", "--backend-kind", "vllm"], "llama.cpp, openai, ollama"),
        (["--backend", "http://h:11434/api/generate"], "--backend-model is needed for Ollama"),
        (
            ["--backend", "http://h:11434/api/generate", "--prompt-template", "{prefix}"],
            "--backend-model is needed for Ollama",
        ),
        (
            "--backend http://h/completion --device gpu --threads 4 --flash-attn true".split(),
            "--device, --threads, --flash-attn: for a local model",
        ),
        (
            ["--backend", "http://127.0.0.1:9/completion"],
            "pass --backend-model NAME or --prompt-template",
        ),
        (
            ["--backend", "http://h/completion", "--backend-model", "mistral-7b-instruct"],
            "--prompt-template",
        ),
        (["--backend", "http://h/completion", "--model", "m.gguf"], "--model and --backend"),
        (
            ["--backend", "http://h/completion", "--backend-timeout", "0"],
            "--backend-timeout must be more than 0",
        ),
    ],
)
def test_startup_problems_with_a_backend_end_in_one_line(args, words, tmp_path):
    result = run(args + ["--root", str(tmp_path)])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().startswith("error: ")
        and "\n" not in result.stderr.strip()
        and words in result.stderr
    ), result.stderr


def test_llama_cpp_python_is_not_needed_with_a_backend(stub, tmp_path):
    (tmp_path / "llama_cpp.py").write_text(
        "raise ImportError('llama-cpp-python is not installed here')\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    proc, url = start_server(
        [
            "--backend",
            stub.url + "/completion",
            "--prompt-template",
            "{prefix}",
            "--root",
            str(tmp_path),
        ],
        env=env,
    )
    try:
        body = json.dumps({"language": "python", "segments": {"prefix": "def f():\n    "}}).encode()
        request = urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        assert (
            json.load(urllib.request.urlopen(request, timeout=10))["choices"][0]["text"] == "x = 1"
        )
    finally:
        log = stop(proc)
    assert (
        "engine llama.cpp at "
        + stub.url
        + ", model Remote: prefix-only prompts (--prompt-template)"
        in log
    )
    result = run(["--model", "m.gguf", "--root", str(tmp_path)], env=env)
    assert (
        result.stderr.strip()
        == "error: --model needs llama-cpp-python: pip install llama-cpp-python (or use --backend URL of an engine)"
    )


def test_flask_run_with_a_backend(stub, tmp_path):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TABBYPY_")},
        "FLASK_APP": "app",
        "TABBYPY_BACKEND": stub.url + "/completion",
        "TABBYPY_ROOT": str(tmp_path),
    }
    log = open(tmp_path / "flask.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "run", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log = log
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}", 30)
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5))
        assert health["model"] == "stub-starcoder" and health["backend"]["answers"]
    finally:
        stop(proc)


def test_chat_through_an_engine_that_fails(stub, backend_app):
    client = backend_app(
        stub.url + "/completion", chat_model="some-chat-model", backend_timeout=0.5
    )
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert sse_text(client.post("/v1/chat/completions", json=chat)) == ["", "x", " = 1", None]
    assert (
        stub.requests[-1][0] == "/v1/chat/completions"
        and stub.requests[-1][2]["model"] == "some-chat-model"
    )
    stub.modes = ["hang"]  # before its answer: a plain JSON error, as for completions
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 504 and "did not answer" in r.get_json()["error"]
    stub.modes = ["cut"]  # half way: the stream says so in an event of its own
    r = client.post("/v1/chat/completions", json=chat)
    events = [json.loads(line[6:]) for line in r.get_data(as_text=True).split("\n") if line]
    assert r.status_code == 200 and events[-1] == {
        "error": {
            "message": f"engine at {stub.url} ended its stream before it finished",
            "code": 502,
        }
    }


def sse_text(response):
    """The content of each chunk of a chat stream (None for the last, which has none)."""
    return [
        json.loads(line[6:])["choices"][0]["delta"].get("content")
        for line in response.get_data(as_text=True).split("\n")
        if line
    ]


# -----------------------------------------------------------------------------
# Real engines' answers, replayed byte for byte (tests/recorded/: llama-server's recorded by
# record.py; Ollama's written from its source, which record.py cites).

RECORDED = os.path.join(ROOT, "tests", "recorded")
record = importlib.util.module_from_spec(
    importlib.util.spec_from_file_location("record", os.path.join(RECORDED, "record.py"))
)
record.__spec__.loader.exec_module(record)


class Replay(http.server.BaseHTTPRequestHandler):
    """An engine that answers every POST with the bytes of a recorded answer: its status line,
    headers and chunked body as the engine sent them."""

    def do_POST(self):
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        try:
            self.wfile.write(self.server.response)
        except OSError:
            pass  # we hung up at a stop word, as on the real engine
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def replay():
    """replay(name) -> the URL of an engine that answers with tests/recorded/NAME.response."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    httpd.daemon_threads, httpd.bodies = True, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def start(name):
        with open(os.path.join(RECORDED, name + ".response"), "rb") as f:
            httpd.response = f.read()
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    start.bodies = httpd.bodies
    yield start
    httpd.shutdown()
    httpd.server_close()


def streamed(response, kind):
    """The pieces of text a recorded answer streams, read as its engine's documentation says
    (nothing of app.py's): the chunked body's lines, SSE "data: " events with "content" up to
    "stop" (llama-server) or JSON lines with "response" up to "done" (Ollama)."""
    head, body = response.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    data = b""
    while not body.startswith(b"0\r\n"):
        size, body = body.split(b"\r\n", 1)
        data, body = data + body[: int(size, 16)], body[int(size, 16) + 2 :]
    lines = data.decode().split("\n")
    if kind == "llama.cpp":
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert events[-1]["stop"] and not any(e["stop"] for e in events[:-1])
        return [e["content"] for e in events]
    events = [json.loads(line) for line in lines if line]
    assert events[-1]["done"] and not any(e["done"] for e in events[:-1])
    return [e["response"] for e in events]


@pytest.mark.parametrize(
    "name, reason",
    [("llama-server-scripted", "stop"), ("llama-server-random", "length"),
     ("llama-server-eos", "eos")],
)  # fmt: skip
def test_llama_servers_recorded_answers_are_cut_as_tabby_cuts_them(replay, tmp_path, name, reason):
    model, flags, body = record.CASES[name]
    url = replay(name)
    config = server.load_config(
        ["--backend", url + "/completion", "--prompt-template", record.TEMPLATE, "--root",
         str(tmp_path), "--time-budget", "0", "--completion-cache", "0", *flags],
        environ={},
    )  # fmt: skip
    client = server.create_app(config).test_client()
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    with open(os.path.join(RECORDED, name + ".request"), "rb") as f:
        sent = json.loads(f.read().split(b"\r\n\r\n", 1)[1])
    assert replay.bodies == [sent]  # what we send is still what the engine answered
    with open(os.path.join(RECORDED, name + ".response"), "rb") as f:
        pieces = streamed(f.read(), "llama.cpp")
    expected = tabby.decode(pieces, body["language"], sent["prompt"])
    assert expected and r.get_json()["choices"][0]["text"] == expected
    [event] = [e["event"]["completion"] for e in read_events(tmp_path / "events")]
    assert event["finish_reason"] == reason


def test_llama_servers_recorded_error_is_passed_on(replay, tmp_path):
    model, flags, body = record.CASES["llama-server-too-long"]
    url = replay("llama-server-too-long")
    client = server.create_app(
        server.load_config(
            ["--backend", url + "/completion", "--prompt-template", record.TEMPLATE, "--root",
             str(tmp_path), *flags],
            environ={},
        )
    ).test_client()  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 502 and r.get_json() == {
        "error": f"engine at {url}: answered 400: request (1014 tokens) exceeds the available "
        "context size (256 tokens), try increasing it"
    }


@pytest.mark.parametrize("name, reason", [("ollama-scripted", "stop"), ("ollama-eos", "eos")])
def test_ollamas_answers_are_cut_as_tabby_cuts_them(replay, tmp_path, name, reason):
    url = replay(name)
    config = server.load_config(
        ["--backend", url + "/api/generate", "--backend-model", "qwen2.5-coder:1.5b-base",
         "--root", str(tmp_path), "--time-budget", "0", "--completion-cache", "0"],
        environ={},
    )  # fmt: skip
    client = server.create_app(config).test_client()
    body = {"language": "python", "segments": {"prefix": "def f(a, b):\n    ", "suffix": "\n"}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    [sent] = replay.bodies
    assert sent["model"] == "qwen2.5-coder:1.5b-base" and sent["raw"] and sent["stream"]
    with open(os.path.join(RECORDED, name + ".response"), "rb") as f:
        pieces = streamed(f.read(), "ollama")
    expected = tabby.decode(pieces, "python", sent["prompt"])
    assert r.get_json()["choices"][0]["text"] == expected
    assert expected in ("total = a + b\n    return a < b && b > 0", "x = \u00e9t\u00e9 + 1")
    [event] = [e["event"]["completion"] for e in read_events(tmp_path / "events")]
    assert event["finish_reason"] == reason
