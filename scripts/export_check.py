#!/usr/bin/env python3
"""Checks an export in the tool it is for, and prints one JSON object.

  export_check.py gguf --model M.gguf --student DIR --text T [--ctx N] [--max-tokens N]
                       [--kv-cache q4_0|q8_0|f16] [--prompt TEXT --greedy N]
      llama.cpp (llama-cpp-python): perplexity of M.gguf on T with exactly `pipeline eval`'s
      windows (ids[ctx*k .. ctx*k + ctx + 1], BOS first, tokens from DIR/tokenizer.json),
      whether llama.cpp tokenizes T as tokenizer.json does, and greedy continuation ids.
  export_check.py ct --model DIR --tokens 1,2,3 --out LOGITS.safetensors
      transformers + compressed-tensors on the CPU: the folder's logits for the tokens, and its
      quantization scheme as transformers read it.

Exit status 77 (with the reason on stderr) when the consumer cannot be imported here.
"""
import argparse
import json
import math
import sys


def skip(why):
    print(why, file=sys.stderr)
    sys.exit(77)


def our_ids(student, text, max_tokens):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{student}/tokenizer.json")
    cfg = json.load(open(f"{student}/config.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = cfg.get("bos_token_id")
    if bos is not None:
        ids = [bos] + ids
    if max_tokens:
        ids = ids[:max_tokens]
    return ids, bos


def gguf(a):
    try:
        import llama_cpp
        import numpy as np
    except Exception as e:  # noqa: BLE001
        skip(f"llama-cpp-python cannot be imported: {e}")
    text = open(a.text, encoding="utf-8").read()
    ids, bos = our_ids(a.student, text, a.max_tokens)
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[a.kv_cache]
    kwargs = dict(
        model_path=a.model,
        n_ctx=a.ctx + 1,
        n_batch=a.ctx + 1,
        n_ubatch=a.ctx + 1,
        logits_all=True,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
        seed=0,
        type_k=kv,
        type_v=kv,
    )
    if a.kv_cache != "f16":
        # llama.cpp quantizes the V cache only with flash attention.
        kwargs["flash_attn"] = True
    llm = llama_cpp.Llama(**kwargs)
    # Tokenization: llama.cpp's own tokenizer against tokenizer.json (BOS added by both).
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=bos is not None, special=False)
    n_cmp = min(len(theirs), len(ids), 4096)
    first_diff = next((i for i in range(n_cmp) if theirs[i] != ids[i]), None)
    nll, count, windows = 0.0, 0, 0
    start = 0
    while start + 1 < len(ids):
        w = ids[start:start + a.ctx + 1]
        inp, tgt = w[:-1], w[1:]
        llm.reset()
        llm.eval(inp)
        logits = np.asarray(llm.scores[: len(inp)], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        nll -= float((logits[np.arange(len(tgt)), tgt] - lse).sum())
        count += len(tgt)
        windows += 1
        start += a.ctx
    out = {
        "consumer": f"llama-cpp-python {llama_cpp.__version__}",
        "model": a.model,
        "kv_cache": a.kv_cache,
        "ctx": a.ctx,
        "tokens": count,
        "windows": windows,
        "ppl": math.exp(nll / count),
        "tokenization": {"compared": n_cmp, "first_difference": first_diff, "lengths": [len(theirs), len(ids)]},
    }
    if a.prompt is not None:
        p, _ = our_ids(a.student, a.prompt, None)
        llm.reset()
        llm.eval(p)
        gen = []
        for _ in range(a.greedy):
            nxt = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])))
            gen.append(nxt)
            llm.eval([nxt])
        out["prompt_ids"] = p
        out["greedy"] = gen
    print(json.dumps(out))


def ct(a):
    try:
        import torch
        import compressed_tensors  # noqa: F401
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
    except Exception as e:  # noqa: BLE001
        skip(f"transformers + compressed-tensors cannot be imported: {e}")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[int(t) for t in a.tokens.split(",")]])
    with torch.no_grad():
        logits = model(ids).logits[0].float().contiguous()
    save_file({"logits": logits}, a.out)
    q = model.config.quantization_config
    q = q.to_dict() if hasattr(q, "to_dict") else q
    groups = q.get("config_groups", {})
    g = next(iter(groups.values())) if groups else {}
    layer = model.model.layers[0].self_attn.q_proj
    print(json.dumps({
        "consumer": f"transformers + compressed-tensors {compressed_tensors.__version__}",
        "layer_class": type(layer).__name__,
        "quantization_status": str(getattr(layer, "quantization_status", None)),
        "weights": g.get("weights"),
        "input_activations": g.get("input_activations"),
        "logits_shape": list(logits.shape),
    }))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("--model", required=True)
    g.add_argument("--student", required=True)
    g.add_argument("--text", required=True)
    g.add_argument("--ctx", type=int, default=512)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--kv-cache", default="f16", choices=["f16", "q8_0", "q4_0"])
    g.add_argument("--prompt")
    g.add_argument("--greedy", type=int, default=16)
    g.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("ct")
    c.add_argument("--model", required=True)
    c.add_argument("--tokens", required=True)
    c.add_argument("--out", required=True)
    a = ap.parse_args()
    {"gguf": gguf, "ct": ct}[a.cmd](a)


if __name__ == "__main__":
    main()
