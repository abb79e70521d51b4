"""Tiny GGUF models for the tests, built offline with the gguf package (no download).

The recipe is the one in shared/reference/test-models.md, section A: a byte-level BPE
vocabulary in GPT-2's style, and "scripted" weights that make the model a bigram automaton.
Every block adds exactly 0 to the residual stream, so the logits depend only on the last
token: after the family's FIM middle token the model writes FIM_SCRIPT, after any other
token PLAIN_SCRIPT, then end-of-text; the chat family writes CHAT_SCRIPT after its
assistant turn's marker, and has a chat template (CHAT_TEMPLATE) in its metadata. The output is exact on every CPU and thread count.
"random" weights write deterministic nonsense instead, and never end by themselves: the rows
of special tokens, lone bytes and (optionally) newlines are zeroed, so their logits are 0 and
some other logit is always higher. They serve limits, cancellation and benchmarks.

    python tests/tinymodel.py starcoder /tmp/tiny.gguf
"""

import sys

import gguf
import numpy as np

# special tokens per family: end-of-text first (id 0), then the FIM markers.
# "middle" is the marker after which the model sees a FIM prompt end (None: no FIM).
FAMILIES = {
    "starcoder": {
        "specials": ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"],
        "fim": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        "middle": "<fim_middle>",
    },
    "codellama": {
        "specials": ["</s>", "<PRE>", "<SUF>", "<MID>", "<EOT>"],
        "fim": ("<PRE>", "<SUF>", "<MID>"),
        "middle": "<MID>",
    },
    "deepseek": {
        "specials": ["<｜end▁of▁sentence｜>", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
        "fim": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
        "middle": "<｜fim▁end｜>",
    },
    # Qwen2.5-Coder's FIM tokens and its repository-level ones (llama.cpp's fim_rep, fim_sep)
    "qwen": {
        "specials": [
            "<|endoftext|>",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ],
        "fim": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
        "middle": "<|fim_middle|>",
        "repo": ("<|repo_name|>", "<|file_sep|>"),
    },  # fmt: skip
    # StarCoder2's: StarCoder's FIM tokens and repository-level ones that llama.cpp does not name
    "starcoder2": {
        "specials": [
            "<|endoftext|>",
            "<fim_prefix>",
            "<fim_middle>",
            "<fim_suffix>",
            "<fim_pad>",
            "<repo_name>",
            "<file_sep>",
        ],
        "fim": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        "middle": "<fim_middle>",
    },  # fmt: skip
    "codegemma": {
        "specials": [
            "<|endoftext|>",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            "<|file_separator|>",
        ],
        "fim": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
        "middle": "<|fim_middle|>",
    },
    "codestral": {
        "specials": ["</s>", "[PREFIX]", "[SUFFIX]", "[MIDDLE]"],
        "fim": ("[PREFIX]", "[SUFFIX]", "[MIDDLE]"),
        "middle": None,
    },
    # FIM tokens that no known family uses: the server must build the template from the ids
    "custom": {
        "specials": ["<|endoftext|>", "<fim-prefix>", "<fim-suffix>", "<fim-middle>"],
        "fim": ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
        "middle": "<fim-middle>",
    },
    "plain": {"specials": ["<|endoftext|>"], "fim": None, "middle": None},
    # an instruct model in Phi-4's turn format: the assistant writes after "<|im_start|>assistant<|im_sep|>"
    "chat": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"],
        "fim": None,
        "middle": None,
        "chat": "<|im_sep|>",
    },
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_sep|>{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}"
)

FIM_SCRIPT = "total = a + b\n    return total\n\nclass Calc:\n  pass\n"
PLAIN_SCRIPT = "pass\n"
CHAT_SCRIPT = "Use the add function."

# merged tokens: code pieces and every word of the scripts (a script token must exist whole)
PIECES = [
    "    ",
    "        ",
    "  ",
    "\n\n",
    "\n   ",
    "\n    ",
    "\n",
    "def",
    " def",
    "return",
    " return",
    "class",
    " class",
    "import",
    " import",
    "if",
    " if",
    "else",
    "for",
    " for",
    " in",
    "self",
    "pass",
    "print",
    "None",
    "function",
    " function",
    "const",
    " const",
    "let",
    " let",
    " =",
    " ==",
    " +",
    " -",
    " *",
    " /",
    "()",
    "):",
    "->",
    "total",
    " total",
    " a",
    " b",
    " Calc",
    "Calc",
    ":",
    "add",
    " add",
    "fib",
    " fib",
    "(n",
    "):\n",
    " x",
    " y",
    "Use",
    " the",
]


def byte_encoder():
    """GPT-2's reversible byte -> printable character map (a space is 'Ġ', a newline 'Ċ')."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
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
            left, right, whole = chars[: i - 1], chars[i - 1], chars[:i]
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


def write_model(
    path,
    family="starcoder",
    special_type=3,
    weights="scripted",
    newlines=True,
    seed=0,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_head_kv=2,
    n_ff=128,
    n_ctx=4096,
    chat_template=None,
    fim_script=FIM_SCRIPT,
    plain_script=PLAIN_SCRIPT,
    logit=64.0,
):
    """Write the model to path. fim_script: what it writes after the FIM middle token;
    plain_script: after any other token (code on the cursor line goes after the middle token:
    app.arrange). Each token of both is followed by one token only: a bigram automaton, whose
    next token has logit (every other 0: the default makes it certain, a small one a draw)."""
    spec = FAMILIES[family]
    tokens, types, merges = build_vocab(spec["specials"], special_type)
    shapes = {
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd * n_head_kv // n_head, n_embd),
        "attn_v": (n_embd * n_head_kv // n_head, n_embd),
        "attn_output": (n_embd, n_embd),
        "ffn_gate": (n_ff, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
    }
    if weights == "scripted":
        embd, out = scripted_head(spec, tokens, n_embd, fim_script, plain_script, logit)
        layers = [
            {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
            for _ in range(n_layer)
        ]
    else:
        embd, out, layers = random_weights(tokens, types, shapes, n_layer, newlines, seed)

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0 if weights == "scripted" else 1)  # f32 or f16 matrices
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if spec["fim"]:
        for key, text in zip(("fim_pre", "fim_suf", "fim_mid"), spec["fim"]):
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", tokens.index(text))
    for key, text in zip(("fim_rep", "fim_sep"), spec.get("repo", ())):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", tokens.index(text))
    if chat_template or spec.get("chat"):
        w.add_chat_template(chat_template or CHAT_TEMPLATE)
    w.add_tensor("token_embd.weight", embd)
    if out is not None:  # else the head is tied to the embedding
        w.add_tensor("output.weight", out)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i, layer in enumerate(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name, tensor in layer.items():
            w.add_tensor(f"blk.{i}.{name}.weight", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def scripted_head(spec, tokens, n_embd, fim_script, plain_script, logit):
    """Embedding and output head of the bigram automaton (the blocks are all zeros)."""
    eos, succ = 0, {}
    chains = [split_script(plain_script, tokens)]
    if spec["middle"]:
        chains.append([tokens.index(spec["middle"])] + split_script(fim_script, tokens))
    if spec.get("chat"):
        chains.append([tokens.index(spec["chat"])] + split_script(CHAT_SCRIPT, tokens))
    for (
        chain
    ) in chains:  # successor of each routed token: the scripts as chains ending in end-of-text
        for a, b in zip(chain, chain[1:] + [eos]):
            assert succ.setdefault(a, b) == b, f"token {tokens[a]!r} needs two successors"
    routed = sorted(succ)
    assert len(routed) + 1 <= n_embd, "scripts too long for n_embd"
    embd = np.zeros((len(tokens), n_embd), dtype=np.float32)
    out = np.zeros((len(tokens), n_embd), dtype=np.float32)
    default_dim = len(routed)
    embd[:, default_dim] = 1.0
    for k, t in enumerate(routed):
        embd[t, default_dim] = 0.0
        embd[t, k] = 1.0
        out[succ[t], k] = logit / 8  # after rmsnorm the one-hot is sqrt(64) = 8; all others 0
    out[chains[0][0], default_dim] = logit / 8
    return embd, out


def random_weights(tokens, types, shapes, n_layer, newlines, seed):
    """Random f16 blocks, a head tied to the embedding, and zero rows for the tokens that must
    never come out: special tokens, lone bytes, control characters (and newlines if asked)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n_embd = shapes["attn_q"][1]
    embd = rng.standard_normal((len(tokens), n_embd), dtype=np.float32)
    to_byte = {c: b for b, c in byte_encoder().items()}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        raw = bytes(to_byte.get(c, 0) for c in token)
        try:
            raw.decode()
            bad = (
                kind != 1
                or any(b < 32 and b not in b"\n\t" for b in raw)
                or (not newlines and b"\n" in raw)
            )
        except UnicodeDecodeError:
            bad = True
        if bad:
            embd[i] = 0.0
    std = {"attn_output": 0.5, "ffn_down": 0.5}
    layers = [
        {
            name: (
                rng.standard_normal(shape, dtype=np.float32) * std.get(name, n_embd**-0.5)
            ).astype(np.float16)
            for name, shape in shapes.items()
        }
        for _ in range(n_layer)
    ]
    return embd, None, layers


if __name__ == "__main__":
    write_model(sys.argv[2], sys.argv[1])
