"""The seed design, to measure app.py against: the same model and prompt format through one Llama
behind a lock; the whole prompt sent each time (only what llama-cpp-python reuses by itself),
64 tokens, no cancellation, no early stops.

    python bench/baseline.py --model MODEL.gguf --port 8081
"""

import argparse
import os
import sys
import threading
import uuid

from flask import Flask, jsonify, request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import app as server  # noqa: E402  (only for the model's prompt template)

args = argparse.ArgumentParser()
args.add_argument("--model", required=True)
args.add_argument("--port", type=int, default=8081)
args = args.parse_args()

from llama_cpp import Llama  # noqa: E402

llm = Llama(model_path=args.model, n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
template = server.find_template(llm, "")[0]
lock = threading.Lock()
app = Flask(__name__)


@app.post("/v1/completions")
def completions():
    segments = request.get_json()["segments"]
    prompt = template.replace("{prefix}", segments["prefix"]).replace(
        "{suffix}", segments.get("suffix") or "\n"
    )
    with lock:
        text = llm.create_completion(prompt, max_tokens=64, temperature=0.1)["choices"][0]["text"]
    return jsonify(id=f"cmpl-{uuid.uuid4()}", choices=[{"index": 0, "text": text}])


@app.get("/v1/health")
def health():  # ready once the model is loaded (bench/run.py waits for it)
    return jsonify(model=os.path.basename(args.model))


app.run(host="127.0.0.1", port=args.port, threaded=True)
