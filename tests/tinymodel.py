"""Tiny GGUF models for the tests, built offline with the gguf package (no download).

The recipe is the one in shared/reference/test-models.md, section A: a byte-level BPE
vocabulary in GPT-2's style, and "scripted" weights that make the model a bigram automaton.
Every block adds exactly 0 to the residual stream, so the logits depend only on the last
token: after the family's FIM middle token the model writes FIM_SCRIPT, after any other
token PLAIN_SCRIPT, then end-of-text. The output is exact on every CPU and thread count.

    python tests/tinymodel.py starcoder /tmp/tiny.gguf
"""
import sys

import gguf
import numpy as np

# special tokens per family: end-of-text first (id 0), then the FIM markers.
# "middle" is the marker after which the model sees a FIM prompt end (None: no FIM).
FAMILIES = {
    "starcoder": {"specials": ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"],
                  "fim": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), "middle": "<fim_middle>"},
    "codellama": {"specials": ["</s>", "<PRE>", "<SUF>", "<MID>", "<EOT>"],
                  "fim": ("<PRE>", "<SUF>", "<MID>"), "middle": "<MID>"},
    "deepseek": {"specials": ["<｜end▁of▁sentence｜>", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
                 "fim": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), "middle": "<｜fim▁end｜>"},
    "codegemma": {"specials": ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"],
                  "fim": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), "middle": "<|fim_middle|>"},
    "codestral": {"specials": ["</s>", "[PREFIX]", "[SUFFIX]", "[MIDDLE]"],
                  "fim": ("[PREFIX]", "[SUFFIX]", "[MIDDLE]"), "middle": None},
    # FIM tokens that no known family uses: the server must build the template from the ids
    "custom": {"specials": ["<|endoftext|>", "<fim-prefix>", "<fim-suffix>", "<fim-middle>"],
               "fim": ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"), "middle": "<fim-middle>"},
    "plain": {"specials": ["<|endoftext|>"], "fim": None, "middle": None},
}

FIM_SCRIPT = "total = a + b\n    return total\n\nclass Calc:\n  pass\n"
PLAIN_SCRIPT = "pass\n"

# merged tokens: code pieces and every word of the scripts (a script token must exist whole)
PIECES = ["    ", "        ", "  ", "\n\n", "\n   ", "\n    ", "\n", "def", " def", "return", " return",
          "class", " class", "import", " import", "if", " if", "else", "for", " for", " in", "self",
          "pass", "print", "None", "function", " function", "const", " const", "let", " let", " =",
          " ==", " +", " -", " *", " /", "()", "):", "->", "total", " total", " a", " b", " Calc",
          "Calc", ":", "add", " add", "fib", " fib", "(n", "):\n", " x", " y"]


def byte_encoder():
    """GPT-2's reversible byte -> printable character map (a space is 'Ġ', a newline 'Ċ')."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def build_vocab(specials, special_type=3):
    enc = byte_encoder()
    tokens = list(specials) + [enc[b] for b in range(256)]
    # end-of-text is CONTROL (3); the markers CONTROL, or USER_DEFINED (4) as some GGUFs have them
    types = [3] + [special_type] * (len(specials) - 1) + [1] * 256  # 1 = NORMAL
    merges, known = [], set(tokens)
    for piece in PIECES:
        chars = "".join(enc[b] for b in piece.encode())
        for i in range(2, len(chars) + 1):  # left to right: "d e" -> "de", "de f" -> "def"
            left, right, whole = chars[:i - 1], chars[i - 1], chars[:i]
            if whole not in known:
                merges.append(f"{left} {right}")
                tokens.append(whole)
                types.append(1)
                known.add(whole)
    return tokens, types, merges


def split_script(text, tokens):
    """Greedy longest match of text over the vocabulary (produced, never parsed: any split works)."""
    enc = byte_encoder()
    chars = "".join(enc[b] for b in text.encode())
    index = {t: i for i, t in enumerate(tokens)}
    ids, i = [], 0
    while i < len(chars):
        for j in range(len(chars), i, -1):
            if chars[i:j] in index:
                ids.append(index[chars[i:j]])
                i = j
                break
    return ids


def write_model(path, family="starcoder", special_type=3, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=4096):
    spec = FAMILIES[family]
    tokens, types, merges = build_vocab(spec["specials"], special_type)
    n_vocab, eos = len(tokens), 0

    # successor of each routed token: the scripts as chains ending in end-of-text
    succ = {}
    chains = [split_script(PLAIN_SCRIPT, tokens)]
    if spec["middle"]:
        chains.append([tokens.index(spec["middle"])] + split_script(FIM_SCRIPT, tokens))
    for chain in chains:
        for a, b in zip(chain, chain[1:] + [eos]):
            assert succ.setdefault(a, b) == b, f"token {tokens[a]!r} needs two successors"
    first_plain = chains[0][0]
    routed = sorted(succ)
    assert len(routed) + 1 <= n_embd, "scripts too long for n_embd"

    embd = np.zeros((n_vocab, n_embd), dtype=np.float32)
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)
    default_dim = len(routed)
    embd[:, default_dim] = 1.0
    for k, t in enumerate(routed):
        embd[t, default_dim] = 0.0
        embd[t, k] = 1.0
        out[succ[t], k] = 8.0  # after rmsnorm the one-hot is sqrt(64) = 8: logit 64, all others 0
    out[first_plain, default_dim] = 8.0

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(eos)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if spec["fim"]:
        for key, text in zip(("fim_pre", "fim_suf", "fim_mid"), spec["fim"]):
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", tokens.index(text))

    hd = n_embd // n_head
    zeros = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output.weight", out)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", zeros(n_head * hd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", zeros(n_head_kv * hd, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", zeros(n_head_kv * hd, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", zeros(n_embd, n_head * hd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", zeros(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", zeros(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", zeros(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    write_model(sys.argv[2], sys.argv[1])
