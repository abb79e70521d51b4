"""Answers without the model: completions kept by prompt (revisits), and speculation (the
completion the editor will ask for if the user accepts the one shown, made in idle time)."""

import re
import threading
import time

import llama_cpp
import pytest
from conftest import complete
from test_latency import SLOW

import app as server

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\n\ndef main():\n    print(add(1, 2))\n"


def reasons(caplog):
    """The finish reason of each completion logged so far."""
    return re.findall(r"cmpl-[\w-]+: .*? generated, ([\w ]+);", caplog.text)  # (not speculations)


def wait_for(caplog, text, timeout=30):
    deadline = time.monotonic() + timeout
    while text not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert text in caplog.text, caplog.text


def test_an_accepted_completion_is_answered_from_its_speculation(make_app, caplog):
    caplog.set_level("INFO")
    client = make_app(temperature=0.0, time_budget=0)[0].test_client()
    shown = complete(client, PREFIX, SUFFIX)
    wait_for(caplog, "speculation:")  # the model was idle: it went on as if shown were accepted
    accepted = complete(client, PREFIX + shown, SUFFIX)
    assert reasons(caplog)[-1] == "speculated"
    fresh = make_app(temperature=0.0, time_budget=0, speculate=False, completion_cache=0)
    assert complete(fresh[0].test_client(), PREFIX + shown, SUFFIX) == accepted  # the same text
    assert complete(client, PREFIX + shown, SUFFIX) == accepted
    assert reasons(caplog)[-1] == "cached"  # used once: the second time it is a revisit
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'tabbypy_speculations_total{outcome="used"} 1' in metrics


def test_a_speculation_begins_once_the_answer_is_sent(make_app, caplog):
    """Not while the answer is on its way: until then the CPU is the answer's."""
    caplog.set_level("INFO")
    client = make_app(temperature=0.0, time_budget=0)[0].test_client()
    body = {"language": "python", "segments": {"prefix": PREFIX, "suffix": SUFFIX}}
    response = client.post("/v1/completions", json=body, buffered=False)  # (not yet closed)
    assert response.get_json()["choices"][0]["text"]  # an answer the editor shows
    time.sleep(0.5)
    assert "speculation:" not in caplog.text
    response.close()  # the server has sent it all
    wait_for(caplog, "speculation:")


def parts(args, tmp_path):
    """(the model, the completion service, the speculation's hook) of an app made of args."""
    config = server.load_config(args + ["--root", str(tmp_path)], environ={})
    core = server.create_app(config).extensions["tabbypy"]
    [look_ahead] = core.completions.answered
    return core.backend, core.completions, look_ahead


def asking(completions, look_ahead, language):
    """ask(prefix, suffix, ahead) -> (its Answer, ms in all), as the route asks (look_ahead
    once the answer is sent, if ahead)."""

    def ask(prefix, suffix="\n", ahead=True):
        started, arrivals = time.perf_counter(), completions.arrived()
        body = {"language": language, "segments": {"prefix": prefix, "suffix": suffix}}
        req = server.parse_completion(body)
        answer = completions.answer(req, ("me", None, None), bool)
        wall = (time.perf_counter() - started) * 1000
        if ahead:
            look_ahead(req, answer, arrivals)
        return answer, wall

    return ask


def test_a_request_during_a_speculation_stops_it_and_takes_over_its_tokens(model_path, tmp_path):
    """The model stops speculating when a request comes (inside a token's decode: see the next
    test); when the request is the one speculated, it goes on from the tokens the speculation
    made."""
    args = ["--model", model_path("starcoder", **SLOW), "--temperature", "0", "--time-budget",
            "0", "--max-tokens", "600", "--events", "off"]  # fmt: skip
    model, completions, look_ahead = parts(args, tmp_path)  # (1 ms a token, and never stops)
    ask = asking(completions, look_ahead, "css")
    shown, _ = ask("a {\n")
    deadline = time.monotonic() + 30  # the speculation of "a {" + shown is under way
    while sum(map(len, model.ahead.values())) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    other, wall = ask("b {\n", ahead=False)  # another editor asks
    assert wall - other.ms < 50  # building the prompt, and one token (a millisecond) at most
    [(key, done)] = model.ahead.items()  # where the speculation was
    assert 0 < len(done) < 600 and len(key) > 600  # (key: the accepted prompt, long)
    accepted, _ = ask("a {\n" + shown.text, ahead=False)
    assert (accepted.generated, accepted.reason) == (600, "length")
    assert accepted.text.startswith(model.llm.detokenize(done).decode(errors="ignore")[:20])
    assert accepted.reused == accepted.size  # its prompt was not evaluated again


def test_a_request_keeps_the_editors_kv_cache_not_the_speculations(model_path, caplog, tmp_path):
    """A speculation keeps a copy of the editor's KV cache (its next keystroke gets it back); the
    request that comes after it finished keeps none of the speculation's: the editor did not
    take it (or the completion cache answered that, and the next prompt goes on from it). One
    stopped half way is kept: see the test before."""
    caplog.set_level("INFO")
    args = ["--model", model_path("starcoder"), "--temperature", "0", "--time-budget", "0",
            "--events", "off"]  # fmt: skip
    model, completions, look_ahead = parts(args, tmp_path)
    ask = asking(completions, look_ahead, "python")
    assert ask(PREFIX, SUFFIX)[0].text
    wait_for(caplog, "speculation:")  # done: the KV cache holds the speculation's tokens
    model.thread.submit(lambda: None).result()  # (its last steps too)
    speculation = model.llm.input_ids[: model.llm.n_tokens].tolist()
    [(editor, _, _)] = model.kv_saved.values()  # the editor's, kept when it began
    other = "class Point:\n    def __init__(self, x, y):\n        "
    ask(other, "\n\n\np = Point(1, 2)\n")  # another file: the speculation's KV cache goes
    assert [kept for kept, _, _ in model.kv_saved.values()] == [editor] != [speculation]


def test_a_decode_stops_inside_when_asked_and_the_callback_before_comes_back(model_path):
    """abortable(): llama.cpp asks should_stop() from inside a decode (a speculation's, for each
    token, so that a request waits for no token); a nested one gives the outer one back."""
    llm = llama_cpp.Llama(model_path("starcoder", **SLOW), n_ctx=256, verbose=False)
    tokens = llm.tokenize(b"def add(a, b):\n    return a + b\n", add_bos=False)
    asked = []
    with server.abortable(llm, lambda: asked.append("outer") or True, every=0):
        with server.abortable(llm, lambda: asked.append("inner") or False, every=0):
            llm.eval(tokens[:5])
        assert set(asked) == {"inner"}
        with pytest.raises(RuntimeError) as stopped:
            llm.eval(tokens[5:6])  # the outer one again: it says stop
    assert server.aborted(stopped.value) and asked[-1] == "outer"
    assert llm.n_tokens == 5  # the stopped decode left nothing behind
    llm.eval(tokens[5:])  # no callback any more, and the KV cache goes on from there
    assert llm.n_tokens == len(tokens) and asked[-1] == "outer"


def test_the_cache_never_answers_a_request_that_asks_for_variety(make_app, caplog):
    caplog.set_level("INFO")
    client = make_app(speculate=False)[0].test_client()
    for extra in ({"temperature": 0.0}, {"seed": 7}, {"temperature": 0.8, "seed": 1}):
        complete(client, PREFIX, SUFFIX, **extra)
        complete(client, PREFIX, SUFFIX, **extra)
    assert "cached" not in reasons(caplog)
    complete(client, PREFIX, SUFFIX)
    complete(client, PREFIX, SUFFIX)
    assert reasons(caplog)[-2:] == ["stop", "cached"]


def test_what_is_kept_is_bounded(make_app, caplog):
    caplog.set_level("INFO")
    client = make_app(completion_cache=2, speculate=False)[0].test_client()
    for k in range(3):
        complete(client, PREFIX + " " * k, SUFFIX)
    complete(client, PREFIX + "  ", SUFFIX)  # the newest: kept
    complete(client, PREFIX, SUFFIX)  # the oldest: gone
    assert reasons(caplog)[-2:] == ["cached", "stop"]


def test_a_speculation_nobody_asks_for_is_counted_wasted(make_app, caplog):
    caplog.set_level("INFO")
    app = make_app(completion_cache=1, temperature=0.0)[0]
    client = app.test_client()
    complete(client, PREFIX, SUFFIX)
    wait_for(caplog, "speculation:")
    complete(client, PREFIX + "  ", SUFFIX)  # pushes the speculation's answer out of the cache
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'tabbypy_speculations_total{outcome="wasted"} 1' in metrics


def test_speculations_never_pile_up(make_app, caplog):
    """One at a time, the newest answer's: older ones stop, and a busy model gets none. Six
    editors ask at once: each gets its answer, and the model then makes one speculation, or two
    (one finished between two requests), not one for each answer."""
    caplog.set_level("INFO")
    client = make_app(temperature=0.0)[0].test_client()
    answers = {}

    def ask(k):
        try:
            answers[k] = complete(client, PREFIX + " " * k, SUFFIX)
        except BaseException as e:  # (an assertion error in a thread would be lost)
            answers[k] = e

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == {k: "total = a + b\n    return total" for k in range(6)}
    wait_for(caplog, "speculation:", timeout=10)  # the newest answer's
    made = quiet(caplog, "speculation:")
    assert 1 <= made <= 2, caplog.text


def quiet(caplog, text, still=1.0, timeout=10):
    """How many times text is logged, once it has not been for still seconds (a speculation of
    the tiny model takes milliseconds)."""
    deadline, seen, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = caplog.text.count(text)
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since >= still:
            break
        time.sleep(0.01)
    return seen


def test_a_prefix_only_prompt_is_kept_with_the_cursor_it_was_cut_for(make_app, caplog):
    """A prefix-only prompt does not show the suffix, but where the editor cuts depends on it
    (the middle of a line, or its end): the same prompt with another cursor is not a revisit."""
    caplog.set_level("INFO")
    client = make_app("plain", speculate=False)[0].test_client()
    complete(client, "def f():\n    ", "\n")
    complete(client, "def f():\n    ", ", 2)\n")  # text after the cursor: another cut
    complete(client, "def f():\n    ", "\n")
    assert [r == "cached" for r in reasons(caplog)] == [False, False, True]
