"""What app.py costs outside the model: answers that need no model (the completion cache, typed
through) over HTTP, on a tiny model, for this checkout and another one (a commit before a
refactor, say), taking turns.

    git worktree add /tmp/before COMMIT && python bench/overhead.py --before /tmp/before

(The tiny model comes from tests/tinymodel.py, which needs gguf: tests/requirements.txt.)
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tinymodel  # noqa: E402

BODY = {"language": "python", "segments": {"prefix": "import os\n\ndef add(a, b):\n    ",
                                           "suffix": "\n\n\ndef main():\n    pass\n"}}  # fmt: skip
TYPED = "total = a + b"  # what the tiny model writes first


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    assert conn.getresponse().read()
    conn.close()
    return time.perf_counter() - started


def measure(tree, model, n):
    """{kind: p50 ms} of n answers of each kind from tree's app.py."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(tree, "app.py"), "--model", model,
                             "--port", str(port), "--root", tempfile.mkdtemp()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(600):  # up within 30 s
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/v1/health")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.05)
        cached = [post(port, BODY) for _ in range(n)][20:]  # the first: the model
        typed = []
        for i in range(n):
            body = json.loads(json.dumps(BODY))
            body["segments"]["prefix"] += TYPED[: i % len(TYPED)]  # 0: the model, then typed
            typed.append(post(port, body))
        return {
            "cached": statistics.median(cached) * 1000,
            "typed through": statistics.median(typed) * 1000,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="another checkout's folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    model = tinymodel.write_model(os.path.join(tempfile.mkdtemp(), "tiny.gguf"), "starcoder")
    runs = {"before": [], "this": []}
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("this", ROOT)):
            runs[name].append(measure(tree, model, args.requests))
            print(name, {k: f"{v:.2f} ms" for k, v in runs[name][-1].items()}, flush=True)
    for kind in runs["this"][0]:
        this, before = (statistics.median(r[kind] for r in runs[n]) for n in ("this", "before"))
        print(f"{kind}: p50 {this:.2f} ms, before {before:.2f} ms: {this / before:.2f}x")


if __name__ == "__main__":
    main()
