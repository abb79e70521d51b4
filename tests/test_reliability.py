"""Reliability: any body gets a 4xx with {"error": ...} (a seeded fuzz test), every waiting editor
gets its own completion however many share an address (a load test), and what the server holds
is bounded: KV caches by --kv-cache-mb, a failing events log costs events, not completions."""

import http.client
import json
import random
import re
import resource
import shutil
import signal
import socket
import threading
import time

import llama_cpp
from conftest import complete, output, read_events, start_server, stop

import app as server

SEED = 20261201  # a failure replays with the same requests
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\n\ndef main():\n    print(add(1, 2))\n"
COMPLETION = {
    "language": "python",
    "segments": {
        "prefix": PREFIX,
        "suffix": SUFFIX,
        "filepath": "calc.py",
        "git_url": "https://example.invalid/r.git",
        "declarations": [{"filepath": "util.py", "body": "def util(x):\n    return x"}],
        "relevant_snippets_from_changed_files": [
            {"filepath": "b.py", "body": "b = 1", "score": 0.5}
        ],
        "relevant_snippets_from_recently_opened_files": [{"filepath": "c.py", "body": "c = 2"}],
        "clipboard": "clip",
    },
    "user": "alice",
    "temperature": 0.5,
    "seed": 7,
    "mode": "standard",
    "debug_options": {"return_prompt": True, "return_snippets": True},
}
EVENT = {
    "type": "select",
    "completion_id": "cmpl-1",
    "choice_index": 0,
    "view_id": "v-1",
    "elapsed": 3,
    "user": "alice",
}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ],
    "max_tokens": 4,
    "temperature": 0.5,
    "seed": 1,
    "stop": ["\n"],
    "stream": False,
    "user": "bob",
    "model": "x",
}
ROUTES = [("/v1/completions", COMPLETION), ("/v1/events", EVENT), ("/v1/chat/completions", CHAT),
          ("/v1beta/chat/completions", CHAT), ("/v1/health", {})]  # fmt: skip


def nested(depth, leaf):
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"a": leaf}
    return leaf


def odd_value(rng):
    """A value of some type, seldom the expected one."""
    return rng.choice([
        None, True, False, 0, -1, 1, 2**31, 2**64, 10**400, 1.5, -0.0, 1e308, float("nan"), float("inf"),
        "", "x", "\ud800", "\udfff lone", "é😀\u2028", "\x00", "<|endoftext|>", "a" * 5000,
        [], [1, "x"], {}, {"filepath": "a", "body": 1}, [{"filepath": "a", "body": "b"}],
        nested(rng.choice([10, 100, 900]), "deep"),  # deeper ones: see deep()
    ])  # fmt: skip


def paths(value, path=()):
    """Every place in a JSON value: paths of keys and indices."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, path + (i,))


def deep(rng, body):
    """body's JSON text with one value nested thousands deep (past what Python encodes)."""
    body = json.loads(json.dumps(body))
    path = rng.choice(list(paths(body))[1:] or [()])
    if not path:
        return b"[" * 5000 + b"]" * 5000
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = "@deep@"
    value = rng.choice(['{"a": ' * 1000 + "1" + "}" * 1000, "[" * 5000 + "]" * 5000])
    return json.dumps(body).replace('"@deep@"', value).encode()


def mutate(rng, body):
    """A copy of body with one place replaced, removed or added to."""
    body = json.loads(json.dumps(body))
    path = rng.choice(list(paths(body)))
    if not path:
        return odd_value(rng)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    what = rng.random()
    if what < 0.6:
        parent[path[-1]] = odd_value(rng)
    elif what < 0.8:
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["extra_" + str(rng.randrange(100))] = odd_value(rng)
    else:
        parent.append(odd_value(rng))
    return body


def fuzzed(rng, body):
    """(bytes, content type) of a request body: a mutated JSON value, or broken bytes."""
    what = rng.random()
    if what < 0.55:
        data = json.dumps(mutate(rng, body), ensure_ascii=rng.random() < 0.5).encode(
            "utf-8", "surrogatepass"
        )
    elif what < 0.65:  # duplicate keys, the last one wins
        text = json.dumps(body)
        data = ("{" + text[1:-1] + ", " + text[1:-1] + "}" if len(text) > 2 else text).encode()
    elif what < 0.75:
        data = json.dumps(body).encode()
        cut = rng.randrange(len(data) + 1)
        data = (
            data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + data[cut:]
        )
    elif what < 0.8:
        data = b"\xef\xbb\xbf" + json.dumps(body).encode()  # a UTF-8 BOM
    elif what < 0.82:
        data = deep(rng, body)
    elif what < 0.85:
        data = rng.choice([b'{"segments": ' * 2000, b"NaN", b"Infinity", b"-Infinity", b"1e999",
                           b'{"seed": ' + b"9" * 5000 + b"}", b'{"temperature": 1e999}'])  # fmt: skip
    elif what < 0.9:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    else:
        data = json.dumps(body).encode()[: rng.randrange(len(json.dumps(body)) + 1)]
    kind = rng.choice(["application/json", "application/json", "text/plain", "application/x-www-form-urlencoded",
                       "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"])  # fmt: skip
    return data, kind


def test_fuzzed_bodies_get_a_4xx_and_the_server_keeps_serving(make_app, model_path, caplog):
    app, events = make_app("starcoder", chat_model=model_path("chat"), max_tokens=8)
    client, rng = app.test_client(), random.Random(SEED)
    statuses, started = {}, time.monotonic()
    for i in range(3000):
        path, body = rng.choice(ROUTES)
        data, kind = fuzzed(rng, body)
        query = (
            "?select_kind=" + rng.choice(["line", "%ff%fe", "%ed%a0%80", ""])
            if path == "/v1/events"
            else ""
        )
        r = client.post(path + query, data=data, headers={"Content-Type": kind} if kind else {})
        r.get_data()  # a streamed answer runs to its end
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, path, data[:300], r.get_data()[:300])
        if r.status_code >= 400:
            assert r.is_json and isinstance(r.get_json()["error"], str), (i, path, data[:300])
    took = time.monotonic() - started
    print(f"\nfuzz: 3000 requests in {took:.1f} s, statuses {sorted(statuses.items())}")
    assert (
        statuses.get(200, 0) > 100 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 1000
    )
    assert complete(client, PREFIX, SUFFIX) == "total = a + b\n    return total"
    assert read_events(events)  # every line is whole JSON (read_events parses each)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -----------------------------------------------------------------------------------------------
# Many editors behind one address (a proxy, a NAT): each gets its own completion.

# ten editors' requests, each its own file, with five answers between them (the scripted model's
# text cut by the language's stop words, by text before or after the cursor on its line)
BODIES = [
    {"language": language, "segments": {"prefix": prefix, "suffix": suffix, "filepath": f"src/file{i}.x"}}
    for i, (language, prefix, suffix) in enumerate([
        ("python", PREFIX, SUFFIX),
        ("json", PREFIX, SUFFIX),
        ("python", "def add(a, b):\n    return ", "\n"),
        ("unknown", "x = ", ""),
        ("python", "def f():\n    ", "x\n"),
        ("rust", "fn add(a: i32) -> i32 {\n    ", "\n}\n"),
        ("go", "func f() {\n\tx := ", "\n}\n"),
        ("css", "body {\n    ", "\n}\n"),
        ("python", "class A:\n    def f(self):\n        ", "\n"),
        ("javascript", "function f() {\n  ", "\n}\n"),
    ])
]  # fmt: skip


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200
        data = json.loads(response.read())
        return data["id"], data["choices"][0]["text"]
    finally:
        conn.close()


def test_sixteen_editors_behind_one_address_each_get_their_own_completion(model_path, tmp_path):
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path)])
    port = int(url.rsplit(":", 1)[1])
    try:
        alone = [post(port, body)[1] for body in BODIES]
        assert len(set(alone)) == 5 and all(alone)  # answers that tell the bodies apart
        got, errors = [], []

        def editor(e):
            try:
                for k in range(10):
                    n = (e + k) % len(BODIES)  # editors on the same files at the same time, too
                    got.append((n, *post(port, BODIES[n])))
            except Exception as error:  # counted below, with what it was
                errors.append(repr(error))

        started = time.monotonic()
        threads = [threading.Thread(target=editor, args=(e,)) for e in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        took = time.monotonic() - started
    finally:
        stop(proc)
    print(
        f"\nload: 160 completions from 16 editors at one address in {took:.1f} s, {len(errors)} errors"
    )
    assert errors == [] and len(got) == 160
    assert [text for n, _, text in got] == [alone[n] for n, _, _ in got]
    assert len({cid for _, cid, _ in got}) == 160


def test_two_hundred_stalled_connections_do_not_keep_an_editor_waiting(model_path, tmp_path):
    """Werkzeug's server, as python app.py runs it: a thread for each connection, so clients that
    open a connection and stall (half a request line, half the headers, half a body, or nothing)
    hold only their own thread: an editor's completion comes as it does alone."""
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path)])
    port, stalled = int(url.rsplit(":", 1)[1]), []
    try:
        alone = timed(port, own_prompt(1))
        halves = [b"", b"POST /v1/comp", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConte",
                  b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"lan"]  # fmt: skip
        for n in range(200):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(halves[n % len(halves)])
            stalled.append(conn)
        time.sleep(0.2)
        crowded = timed(port, own_prompt(2))
    finally:
        for conn in stalled:
            conn.close()
        stop(proc)
    assert crowded < alone + 0.5, (alone, crowded)


# -----------------------------------------------------------------------------------------------
# What the server holds


# random weights, a few MB of KV cache for a prompt of some hundred tokens
BIG_KV = dict(
    weights="random", newlines=False, n_embd=512, n_layer=8, n_ff=1024, n_head=8, n_head_kv=4
)


def editors_taking_turns(model_path, kv_cache_mb, names):
    """(model, prompts, reused): a model on BIG_KV with --kv-cache-mb kv_cache_mb, a prompt of
    some hundred tokens for each editor in names, and reused(name), which completes name's
    prompt -> how many of its tokens the KV cache held."""
    config = server.load_config(
        ["--model", model_path("starcoder", **BIG_KV), "--kv-cache-mb", str(kv_cache_mb)],
        environ={},
    )
    model = server.LocalModel(config)
    prompts = {
        name: model.prompt("".join(f"{name}_{i} = {i}\n" for i in range(60)), "\n")
        for name in names
    }

    def reused(name):
        return model.complete(prompts[name], server.Sampling(0, 0), server.Limits(1)).reused

    return model, prompts, reused


def test_kv_caches_kept_for_editors_taking_turns_are_bounded_by_memory(model_path):
    model, prompts, reused = editors_taking_turns(model_path, 5, "abc")
    reused("a")
    one = model.thread.submit(llama_cpp.llama_state_seq_get_size, model.llm.ctx, 0).result()
    assert 2 << 20 < one <= 5 << 20  # one cache fits in 5 MB, two do not
    reused("b")  # a's cache is kept
    reused("c")  # b's is kept: a's, the least recently used, goes
    assert len(model.kv_saved) == 1 and model.kv_bytes <= 5 << 20
    assert reused("b") >= prompts["b"].size - 2  # its own cache came back
    assert reused("a") < 10  # evaluated again: its cache was dropped for the bound


def test_kv_copies_reuse_the_memory_of_copies_that_went(model_path):
    """Memory never touched costs page faults (2-9 ms a MB on a VM): once copies go (dropped
    for the bound, or put back), their buffers hold the next ones, within --kv-cache-mb."""
    model, prompts, reused = editors_taking_turns(model_path, 16, "abcd")
    buffers = []  # every buffer a copy was kept in (held here: an id is never reused)
    for name in "abcdabcdab":  # four editors taking turns, three copies fit
        reused(name)
        buffers += [buffer for _, buffer, _ in model.kv_saved.values()]
        assert model.kv_bytes <= 16 << 20
    one = len(buffers[0])
    assert 2 << 20 < one and 3 * one <= 16 << 20 < 4 * one
    assert len(model.kv_saved) == 3
    assert len({id(buffer) for buffer in buffers}) <= 4  # not one for each of the nine copies
    assert reused("c") >= prompts["c"].size - 2  # its copy came back intact


def test_a_failing_events_log_costs_events_not_completions(make_app, caplog):
    caplog.set_level("INFO")
    app, events = make_app()
    client = app.test_client()
    assert not events.exists()  # made with the first event
    assert complete(client, PREFIX, SUFFIX) and len(read_events(events)) == 1
    shutil.rmtree(events)  # the folder removed: it is made again
    assert complete(client, PREFIX, SUFFIX) and len(read_events(events)) == 1
    shutil.rmtree(events)
    events.write_text("not a folder")  # now it cannot be: every write fails
    for _ in range(3):
        assert complete(client, PREFIX, SUFFIX) == "total = a + b\n    return total"
        r = client.post("/v1/events", json=EVENT)
        assert r.status_code == 503 and "the event was not stored" in r.get_json()["error"]
    failures = [r for r in caplog.records if "events log: cannot write" in r.getMessage()]
    assert len(failures) == 1  # said once, not per request
    events.unlink()  # mended: events are stored again
    assert client.post("/v1/events", json=EVENT).status_code == 200
    shutil.rmtree(events)
    events.write_text("not a folder")  # and broken again: said again
    assert client.post("/v1/events", json=EVENT).status_code == 503
    failures = [r for r in caplog.records if "events log: cannot write" in r.getMessage()]
    assert len(failures) == 2


def test_a_full_disk_cuts_no_line_in_the_events_log(make_app, caplog):
    """A write that the disk cuts short is taken back: the day file keeps whole lines only, the
    completion is answered, the event is counted lost, and once there is room again events are
    stored whole. (The disk fills up as far as RLIMIT_FSIZE: a write past it is cut short there,
    as on a full disk; SIGXFSZ, which would end the process, is ignored meanwhile.)"""
    caplog.set_level("INFO")
    app, events = make_app()
    client = app.test_client()
    assert complete(client, PREFIX, SUFFIX)
    [path] = events.glob("*.json")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:  # room for 40 more bytes: less than an event's line
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 40, hard))
        assert complete(client, PREFIX, SUFFIX) == "total = a + b\n    return total"
        r = client.post("/v1/events", json=EVENT)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert r.status_code == 503 and "No space left on device" in r.get_json()["error"]
    assert path.read_bytes() == before  # the line cut short is gone
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "tabbypy_events_lost_total 2" in metrics
    assert client.post("/v1/events", json=EVENT).status_code == 200
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_a_body_over_the_limit_names_the_limit_and_the_knob(make_app):
    r = (
        make_app(max_body=1000)[0]
        .test_client()
        .post("/v1/completions", json={"segments": {"prefix": "x" * 2000}})
    )
    assert (
        r.status_code == 413
        and "1000 bytes" in r.get_json()["error"]
        and "--max-body" in r.get_json()["error"]
    )


def test_a_chunked_body_over_the_limit_gets_the_413_too(model_path, tmp_path):
    """Without a Content-Length, Werkzeug cuts a body at the limit without a word: a 400 "not
    valid JSON" would blame the client's JSON, not the size."""
    proc, url = start_server(
        ["--model", model_path(), "--root", str(tmp_path), "--max-body", "1000"]
    )
    try:
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        body = json.dumps({"segments": {"prefix": "x" * 3000}}).encode()
        chunks = (body[i : i + 500] for i in range(0, len(body), 500))
        conn.request("POST", "/v1/completions", chunks, {"Content-Type": "application/json"},
                     encode_chunked=True)  # fmt: skip
        r = conn.getresponse()
        status, error = r.status, json.loads(r.read())["error"]
        conn.close()
    finally:
        stop(proc)
    assert status == 413 and "1000 bytes" in error and "--max-body" in error


# -----------------------------------------------------------------------------------------------
# A huge request does not stall the others


def big_prefix(size):
    lines = [
        f"    value_{i} = compute(value_{i - 1}, {i})  # step {i}\n" for i in range(1, size // 40)
    ]
    return "def f():\n" + "".join(lines)[: size - 9]


def test_a_huge_prefix_is_cut_near_the_cursor_before_it_is_tokenized(model_path):
    config = server.load_config(["--model", model_path(), "--max-tokens", "16"], environ={})
    completions = server.Completions(server.LocalModel(config), config)
    prefix = big_prefix(1 << 20)  # 18,000 lines
    req = server.parse_completion(
        {"language": "python", "segments": {"prefix": prefix, "suffix": "\n"}}
    )
    answer = completions.answer(req, ("127.0.0.1", None, None), lambda: False)
    assert (
        4096 - 16 - 16 * 60 <= answer.size <= 4096 - 16
    )  # full, less a step of 16 lines (55 tokens)
    above, rest = answer.prompt[len("<fim_prefix>") :].split("<fim_suffix>")
    assert prefix.endswith(above + rest.split("<fim_middle>")[1])  # its end, the cursor line last
    assert completions.line_tokens.cache_info().currsize < 100  # lines tokenized to count them
    completions.line_tokens.cache_clear()
    gone = completions.answer(req, ("127.0.0.1", None, None), lambda: True)  # the client hung up
    assert gone.reason == "cancelled" and completions.line_tokens.cache_info().currsize <= 1


def test_a_small_request_after_an_abandoned_huge_one_is_not_kept_waiting(model_path, tmp_path):
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path), "--max-body",
                              str(4 << 20), "--completion-cache", "0"])  # fmt: skip
    port = int(url.rsplit(":", 1)[1])
    try:
        small = BODIES[0]
        post(port, small)
        idle = min(timed(port, small) for _ in range(3))
        huge = json.dumps(
            {"language": "python", "segments": {"prefix": big_prefix(1 << 20), "suffix": "\n"}}
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", huge, {"Content-Type": "application/json"})
        conn.close()  # abandoned, as the editor does on the next keystroke
        after = timed(port, small)
        deadline = time.monotonic() + 10  # the huge one's thread may still be reading its body
        while "cancelled" not in output(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        log = stop(proc)
    counts = re.findall(r"(\d+) prompt tokens \((\d+) reused\), (\d+) generated, ([\w ]+);", log)
    assert ("0", "0", "cancelled") in [c[1:] for c in counts]  # it never touched the model
    size, reused, _, _ = [c for c in counts if c[3] != "cancelled"][-1]
    assert int(reused) == int(size) - 1  # nor the KV cache: the small prompt is still in it
    assert after < idle + 0.5, (after, idle)


def timed(port, body):
    started = time.monotonic()
    post(port, body)
    return time.monotonic() - started


def own_prompt(n):
    """COMPLETION with a prompt of its own: the model answers it, not the completion cache."""
    return dict(COMPLETION, segments=dict(COMPLETION["segments"], prefix=f"# {n}\n" + PREFIX))
