"""Latency mechanisms: no work for requests nobody waits for, typed-through answers, time budget."""

import concurrent.futures
import fcntl
import http.client
import json
import os
import re
import resource
import select
import socket
import ssl
import subprocess
import threading
import time

import llama_cpp
import pytest
import tinymodel
from conftest import complete, generate, output, read_events, start_server, stop

import app as server

# random weights, no newline tokens: never stops by itself, about a millisecond a token here
SLOW = dict(
    weights="random", newlines=False, n_embd=512, n_layer=8, n_ff=1024, n_head=8, n_head_kv=4
)
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n"


def connection(kind, tmp_path):
    """(ours, theirs): the two ends of a client's connection, ours a plain socket, one whose file
    descriptor is past select()'s 1023 (a server with many open files), or TLS (flask run
    --cert)."""
    ours, theirs = socket.socketpair()
    if kind == "past 1023":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft <= 1024:  # (a soft ulimit -n of 1024 is common: raised, as a busy server's is)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        fd = fcntl.fcntl(ours.fileno(), fcntl.F_DUPFD_CLOEXEC, 1024)
        ours.close()
        ours = socket.socket(fileno=fd)
    elif kind == "tls":
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        served.load_cert_chain(cert, key)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            theirs = pool.submit(client.wrap_socket, theirs)
            ours = served.wrap_socket(ours, server_side=True)
            theirs = theirs.result(timeout=10)
    return ours, theirs


@pytest.mark.parametrize("kind", ["plain", "past 1023", "tls"])
def test_client_gone_sees_a_closed_socket(kind, tmp_path):
    ours, theirs = connection(kind, tmp_path)
    environ = {"werkzeug.socket": ours}
    assert not server.ClientGone(environ)()
    theirs.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request is not a hang-up
    assert not server.ClientGone(environ)()
    assert ours.recv(100)
    theirs.close()
    assert server.ClientGone(environ)()
    ours.close()
    assert server.ClientGone(environ)()  # nor can a closed socket say otherwise
    assert not server.ClientGone({})()  # another server: cannot tell


@pytest.mark.parametrize("kind", ["plain", "past 1023"])
def test_watch_hangs_up_on_the_engine_as_the_client_hangs_up_and_not_for_its_data(kind, tmp_path):
    """watch() waits on the client's socket (no thread waking every 10 ms beside the engine)."""
    for pipelined in (False, True):
        ours, theirs = connection(kind, tmp_path)  # the client's connection
        engine, far = socket.socketpair()  # ours to the engine
        asked = []

        class Counted(server.ClientGone):
            def __call__(self):
                asked.append(1)
                return super().__call__()

        done = server.watch(engine, Counted({"werkzeug.socket": ours}))
        if pipelined:
            theirs.sendall(b"GET / HTTP/1.1\r\n")  # not a hang-up
        time.sleep(0.3)
        assert len(asked) > 20 if pipelined else len(asked) <= 4  # (every 10 ms, or 0.1 s)
        assert not select.select([far], [], [], 0)[0]  # the engine's connection is as it was
        if pipelined:
            assert ours.recv(100)  # (else its end cannot be seen behind it)
        theirs.close()
        closed = time.monotonic()
        assert select.select([far], [], [], 2)[0] and far.recv(1) == b""  # hung up on
        assert time.monotonic() - closed < 0.05, pipelined
        done.set()
        for sock in (ours, engine, far):
            sock.close()


def test_the_loop_stops_at_the_first_token_after_should_stop(model_path):
    llm = llama_cpp.Llama(model_path=model_path("starcoder", **SLOW), n_ctx=1024, verbose=False)
    tokens = llm.tokenize(
        b"<fim_prefix>def f():\n    <fim_suffix>\n<fim_middle>", add_bos=False, special=True
    )
    calls = []
    stop_after = lambda: calls.append(1) or len(calls) > 10  # noqa: E731
    text, generated, reason = generate(llm, tokens, 500, should_stop=stop_after)
    assert (text, reason) == ("", "cancelled")
    assert (
        len(calls) == 11 and 1 <= generated <= 10
    )  # checked between tokens; ends at the first yes


def test_a_disconnected_request_stops_generating(model_path, tmp_path):
    proc, url = start_server(
        [
            "--model",
            model_path("starcoder", **SLOW),
            "--root",
            str(tmp_path),
            "--max-tokens",
            "3500",
            "--time-budget",
            "0",
        ]
    )
    try:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(
            {"language": "css", "segments": {"prefix": "body {\n", "suffix": "\n"}}
        ).encode()
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        time.sleep(0.5)
        closed = time.monotonic()
        conn.close()  # as tabby-agent does when the user types on
        deadline = closed + 30  # the whole generation takes about 10 s here
        while "generated" not in output(proc) and time.monotonic() < deadline:
            time.sleep(0.02)
        noticed = time.monotonic() - closed
    finally:
        log = stop(proc)
    generated, reason = re.search(r"(\d+) generated, (\w+);", log).groups()
    assert reason == "cancelled" and int(generated) < 3500
    assert noticed < 1, noticed  # checked between tokens: a few milliseconds


def test_the_same_client_twice_at_once_gets_both_answers(make_app):
    """Two editors behind one address, on files with the same path, typing at once: no request
    ends another (tabby-agent sends no identity of its own, so the two cannot be told apart)."""
    client, results = make_app()[0].test_client(), {}

    def post(key, prefix):
        body = {
            "language": "python",
            "segments": {"prefix": prefix, "suffix": "\n", "filepath": "a.py"},
        }
        results[key] = client.post("/v1/completions", json=body).json["choices"][0]["text"]

    threads = [threading.Thread(target=post, args=(k, PREFIX + " " * k)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {k: "total = a + b\n    return total" for k in range(4)}


def test_a_waiting_request_whose_client_hangs_up_leaves_the_queue(model_path, tmp_path):
    proc, url = start_server(["--model", model_path("starcoder", **SLOW), "--root", str(tmp_path),
                              "--max-tokens", "1500", "--time-budget", "0"])  # fmt: skip
    port, busy = int(url.rsplit(":", 1)[1]), {}
    try:

        def other_editor():  # holds the model for about 1.5 s
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            body = {"language": "css", "segments": {"prefix": "a {\n", "suffix": "\n"}}
            conn.request(
                "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            busy["text"] = json.loads(conn.getresponse().read())["choices"][0]["text"]

        thread = threading.Thread(target=other_editor)
        thread.start()
        time.sleep(0.3)
        body = json.dumps(
            {"language": "css", "segments": {"prefix": "b {\n", "suffix": "\n"}}
        ).encode()
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        time.sleep(0.3)  # waiting for the model
        closed = time.monotonic()
        conn.close()
        while "0 generated, cancelled" not in output(proc) and time.monotonic() < closed + 10:
            time.sleep(0.01)
        gave_up = time.monotonic() - closed
        thread.join(60)
    finally:
        log = stop(proc)
    assert gave_up < 1  # it left the queue without touching the model
    assert busy["text"] and "1500 generated, length" in log  # the other editor got all of its own


def test_typed_through_answers_the_rest_without_the_model(make_app, caplog):
    caplog.set_level("INFO")
    app, events = make_app()
    client = app.test_client()
    full = complete(client, PREFIX, SUFFIX)
    assert full == "total = a + b\n    return total"
    started = time.perf_counter()
    rest = complete(client, PREFIX + "total = a", SUFFIX)
    assert rest == " + b\n    return total"
    assert time.perf_counter() - started < 0.1
    assert "typed through" in caplog.records[-1].getMessage()
    assert complete(client, PREFIX + "total = a + b\n    return", SUFFIX) == " total"
    # anything else goes to the model: a typo, another suffix, asking for variety
    for prefix, suffix, body in [
        (PREFIX + "totl", SUFFIX, {}),
        (PREFIX + "total", "\n\nx\n", {}),
        (PREFIX + "total", SUFFIX, {"temperature": 0.8}),
    ]:
        complete(client, prefix, suffix, **body)
        assert "typed through" not in caplog.records[-1].getMessage()


def test_the_time_budget_ends_at_a_line_end(model_path):
    llm = llama_cpp.Llama(model_path=model_path("starcoder"), n_ctx=1024, verbose=False)
    tokens = llm.tokenize(
        b"<fim_prefix>def f():\n    <fim_suffix>\n<fim_middle>", add_bos=False, special=True
    )
    assert generate(llm, tokens, 400, budget=60)[0] == tinymodel.FIM_SCRIPT  # not spent
    text, _, reason = generate(llm, tokens, 400, budget=1e-9)
    assert (text, reason) == (
        "total = a + b",
        "time",
    )  # spent at once: the line being written ends it


def test_a_request_past_its_time_budget_ends_at_a_line_end_and_is_not_kept(make_app):
    """--time-budget 1: a prompt of 2,400 tokens takes longer than 1 ms to evaluate, so the
    budget is spent by the first token and the answer ends with the line being written; such an
    answer is not kept, so the same request goes to the model again."""
    app, events = make_app(time_budget=1, speculate=False)
    client = app.test_client()
    prefix = "x = 1\n" * 600 + PREFIX
    assert complete(client, prefix, SUFFIX) == "total = a + b"
    assert complete(client, prefix, SUFFIX) in ("total = a + b", "total = a + b\n    return total")
    reasons = [e["event"]["completion"]["finish_reason"] for e in read_events(events)]
    assert reasons[0] == "time" and reasons[1] != "cached", reasons


def test_threads_default_to_physical_cores(make_app, capsys):
    """--threads 0 gives llama.cpp a thread per physical core this process may run on (as the
    kernel's topology counts them: hyper-threads of one core are one), and start-up says so."""
    topology = "/sys/devices/system/cpu/cpu{}/topology/{}"
    cores = {
        tuple(
            open(topology.format(cpu, name)).read() for name in ("physical_package_id", "core_id")
        )
        for cpu in os.sched_getaffinity(0)
    }
    make_app(threads=0)
    make_app(threads=3)
    said = re.findall(r"ctx \d+, (\d+) threads", capsys.readouterr().err)
    assert said == [str(len(cores)), "3"]


@pytest.mark.parametrize("kv_cache_mb", [1024, 0])
def test_editors_taking_turns_get_their_kv_cache_back(make_app, caplog, kv_cache_mb):
    """Two editors behind one address, sending no file path (tabby-agent over LSP): the KV cache
    each one's prompt left is found again by what it holds, not by whose it was. With
    --kv-cache-mb 0 none is kept: each editor's prompt is evaluated again."""
    caplog.set_level("INFO")
    client = make_app(kv_cache_mb=kv_cache_mb)[0].test_client()

    def ask(prefix):
        body = {"language": "python", "segments": {"prefix": prefix, "suffix": "\n"}}
        assert client.post("/v1/completions", json=body).status_code == 200
        line = caplog.records[-1].getMessage()
        return tuple(map(int, re.search(r"(\d+) prompt tokens \((\d+) reused\)", line).groups()))

    a, b = (
        "".join(f"alpha_{i} = {i}\n" for i in range(40)),
        "".join(f"beta_{i} = {i}\n" for i in range(40)),
    )
    ask(a)
    assert ask(b)[1] < 8  # another editor takes the model: nothing of a's prompt is of use to it
    for prefix in (a + "x = ", b + "y = "):
        prompt, reused = ask(prefix)
        if kv_cache_mb:  # its prompt came back from its kept copy, not evaluated again
            assert reused >= prompt - 8
        else:
            assert reused < 8
    metrics = client.get("/metrics").get_data(as_text=True)
    kept = int(re.search(r"^tabbypy_kv_cache_bytes (\d+)", metrics, re.M).group(1))
    assert kept > 0 if kv_cache_mb else kept == 0


def test_a_client_that_hangs_up_stops_a_long_prompt_in_the_middle_of_a_batch(model_path, tmp_path):
    """A prompt is evaluated in 512-token batches (as fast as llama.cpp goes); llama.cpp's abort
    callback asks whether the client is still there every few milliseconds inside a batch."""
    proc, url = start_server(["--model", model_path("starcoder", **SLOW), "--root", str(tmp_path)])
    try:
        port = int(url.rsplit(":", 1)[1])
        prefix = "".join(f"value_{i} = compute(value_{i - 1}, {i})\n" for i in range(120))
        body = json.dumps({"language": "python", "segments": {"prefix": prefix}}).encode()
        started = time.monotonic()  # first the whole prompt, to know how long it takes
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
        whole = time.monotonic() - started
        body = body.replace(b"value_", b"other_")  # a prompt the KV cache does not hold
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        time.sleep(whole / 4)  # in the first of its 512-token batches (they end at 39 % and 79 %)
        closed = time.monotonic()
        conn.close()
        while output(proc).count("prompt tokens") < 2 and time.monotonic() < closed + 30:
            time.sleep(0.01)
        noticed = time.monotonic() - closed
    finally:
        log = stop(proc)
    tokens, generated, reason = re.findall(r"(\d+) prompt tokens.*?(\d+) generated, (\w+);", log)[1]
    assert reason == "cancelled" and generated == "0" and int(tokens) > 1000
    # inside the first batch: a check between batches would notice 14 % of whole later
    assert noticed < min(0.1, whole / 8), (whole, noticed)
    assert "removing memory module" not in log  # llama.cpp's line for an aborted decode: no error


def test_a_long_prompt_after_kept_tokens_goes_in_batches_that_end_where_llamas_kv_view_ends(
    model_path,
):
    """llama.cpp attends over the KV cache's cells up to the next multiple of 256 past the last
    one used: eval_prompt() cuts a prompt after kept tokens so that its 512-token batches end on
    such multiples (all but the last), and the model computes the same as in plain batches."""
    logits = {}
    for aligned in (True, False):
        llm = llama_cpp.Llama(model_path("starcoder", **SLOW), n_ctx=2048, verbose=False)
        tokens = (llm.tokenize(b"def add(a, b):\n    return a + b\n", add_bos=False) * 200)[:1300]
        llm.eval(tokens[:3])  # kept from an earlier prompt
        ends, decode = [], llm._ctx.decode

        def recorded(batch):  # where each of llama.cpp's decodes ends
            ends.append(llm.n_tokens + batch.batch.n_tokens)
            return decode(batch)

        llm._ctx.decode = recorded
        if aligned:
            assert server.eval_prompt(llm, tokens[3:], lambda: False)
            assert ends == [512, 1024, 1300]
        else:
            llm.eval(tokens[3:])
            assert ends == [515, 1027, 1300]  # (llama-cpp-python's: to 768 and 1280 cells)
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        logits[aligned] = llama_cpp.llama_get_logits_ith(llm.ctx, -1)[:vocab]
    assert max(abs(a - b) for a, b in zip(logits[True], logits[False])) < 1e-3
    assert max(map(abs, logits[True])) > 1e-3  # (logits, not zeros)
