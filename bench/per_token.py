"""The time a generated token costs outside llama_decode: llama-cpp-python's own loop
(Llama.generate: sampling, bookkeeping) and ours on top of it (detokenizing, the stop rules, the
editor's cut, the model thread's hand-off), on a model so small that decoding is nearly free, as
it is on a fast GPU, where this is what is left.

    python bench/per_token.py                       # a tiny model (tests/tinymodel.py: gguf)
    python bench/per_token.py --model PATH.gguf     # a real vocabulary: Gemma 3's has 262,144

What is outside llama_decode grows with the vocabulary: each token's logits are copied into
llama-cpp-python's numpy array and sampled over the whole vocabulary.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import llama_cpp  # noqa: E402
import tinymodel  # noqa: E402

import app as server  # noqa: E402

TOKENS = 256  # generated a run (--tokens)
in_decode = [0.0]
decode = llama_cpp._internals.LlamaContext.decode


def timed_decode(self, batch):
    started = time.perf_counter()
    try:
        return decode(self, batch)
    finally:
        in_decode[0] += time.perf_counter() - started


llama_cpp._internals.LlamaContext.decode = timed_decode


def per_token(run):
    """(ms a token in all, ms a token outside llama_decode) of run(), which generates TOKENS."""
    in_decode[0] = 0.0
    started = time.perf_counter()
    n = run()
    total = time.perf_counter() - started
    return total / n * 1000, (total - in_decode[0]) / n * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file (default: a tiny random-weight model)")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    args = parser.parse_args()
    path = args.model or os.path.join(tempfile.mkdtemp(), "tiny.gguf")
    if not args.model:
        tinymodel.write_model(path, "starcoder", weights="random", newlines=False)
    config = server.load_config(["--model", path, "--max-tokens", str(args.tokens), "--events", "off",
                                 "--time-budget", "0"], environ={})  # fmt: skip
    model = server.LocalModel(config)
    prompt = model.prompt("def main():\n    x = 1\n", "\n")
    llm, results = model.llm, {"llama-cpp-python's generate()": [], "ours (LocalModel)": []}

    def theirs():
        llm.reset()
        for n, _ in enumerate(llm.generate(prompt.tokens, temp=0, repeat_penalty=1.0), 1):
            if n == args.tokens:
                return n

    def ours():
        llm.reset()  # (no KV reuse: the same work as theirs)
        limits = server.Limits(args.tokens)
        return model.complete(prompt, server.Sampling(0, 0), limits).generated

    for _ in range(5):
        results["llama-cpp-python's generate()"].append(per_token(theirs))
        results["ours (LocalModel)"].append(per_token(ours))
    for name, runs in results.items():
        total = statistics.median(r[0] for r in runs)
        outside = statistics.median(r[1] for r in runs)
        print(f"{name}: {total:.3f} ms a token, {outside:.3f} ms of it outside llama_decode")


if __name__ == "__main__":
    main()
