#!/usr/bin/env python3
"""The PyTorch side of the CPU side-by-side benchmark (issue 22): the same work as the
pipeline, on the same model folder, with PyTorch eager + transformers in f32 on 2 threads.

Work items (each runs in its own process so that its peak RSS is its own):
  generate  sampling with a KV cache from a 1-token prompt: batch 1 x 64 new tokens and
            batch 16 x 128 new tokens (tokens/s = batch * new tokens / seconds of generate()).
  eval      perplexity as `pipeline eval` scores it: [BOS] + encode(text) cut to the first
            --eval-tokens ids, non-overlapping windows of ctx + 1 ids, --eval-batch windows of
            equal length at a time (tokens/s = predicted tokens / seconds of the scoring loop).
  train     a plain PyTorch reference of `pipeline train --w-bits 4 --a-bits 8 --kv-bits 4`:
            the student is a copy of the teacher whose 7 projections fake-quantize their
            weights (4-bit, per output channel, symmetric MinMax) and inputs (8-bit, per token);
            k_proj / v_proj outputs are fake-quantized to 4 bits per token (before RoPE: the
            post-RoPE point is hard to reach in HF eager); straight-through estimator
            x + (q - x).detach(); loss = cross-entropy against the teacher's soft logits (the
            teacher runs online, no grad); AdamW. One untimed warmup step, then --train-steps
            timed steps (tokens/s = batch * seq_len * steps / seconds); peak RSS of the process.
  nf4       bitsandbytes NF4 + double quantization (blocks of 64) of the 7 projections of every
            layer, input bytes (as stored in the file) per second; skipped with a message when
            bitsandbytes is not importable.

  python3 benchmarks/cpu_peer.py --model DIR --text FILE [--work all|generate|eval|train|nf4]

Prints one JSON object on stdout.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setup(threads):
    import torch

    torch.set_num_threads(threads)
    return torch


def load(torch, folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def peak_rss_bytes():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def work_generate(a):
    torch = setup(a.threads)
    model = load(torch, a.model)
    eos = model.config.eos_token_id
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)

    def run(batch, new):
        prompt = torch.randint(3, vocab, (batch, 1), generator=g)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=eos,
            use_cache=True,
        )
        secs = time.perf_counter() - t0
        made = out.shape[0] * (out.shape[1] - 1)
        return {
            "batch": batch,
            "new_tokens_per_row": new,
            "new_tokens": made,
            "seconds": secs,
            "tokens_per_second": made / secs,
        }

    run(1, 4)  # warmup (untimed): first-call allocations and kernels
    rows = {}
    for batch, new in ((1, 64), (16, 128)):
        rows[f"batch{batch}"] = run(batch, new)
    return {
        "generate": rows,
        "timing": "seconds of model.generate() after a short untimed warmup; model load excluded",
        "peak_rss_bytes": peak_rss_bytes(),
    }


def work_eval(a):
    torch = setup(a.threads)
    import tokenizers

    model = load(torch, a.model)
    tok = tokenizers.Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = [model.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids
    ids = ids[: a.eval_tokens]
    ctx, n = a.ctx, len(ids)
    windows, start = [], 0
    while start + 1 < n:
        windows.append((start, min(ctx + 1, n - start)))
        start += ctx
    groups = []
    for w in windows:
        if groups and len(groups[-1]) < a.eval_batch and groups[-1][0][1] == w[1]:
            groups[-1].append(w)
        else:
            groups.append([w])
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for grp in groups:
            x = torch.tensor([ids[s : s + l] for s, l in grp])
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            lp = torch.log_softmax(logits.float(), dim=-1)
            tgt = x[:, 1:]
            nll -= lp.gather(-1, tgt.unsqueeze(-1)).double().sum().item()
            count += tgt.numel()
    secs = time.perf_counter() - t0
    return {
        "eval": {
            "ctx": ctx,
            "batch": a.eval_batch,
            "ids": n,
            "windows": len(windows),
            "tokens": count,
            "nll": nll / count,
            "seconds": secs,
            "tokens_per_second": count / secs,
        },
        "timing": "seconds of the scoring loop (forward, log-softmax, gather); load and tokenization excluded",
        "peak_rss_bytes": peak_rss_bytes(),
    }


def fake_quant(torch, x, bits, dim):
    """Symmetric MinMax fake quantization with one scale per slice along `dim` (the reduced
    dimension), rounding half to even; a zero scale gives 0."""
    qmax = 2 ** (bits - 1) - 1
    alpha = x.detach().abs().amax(dim=dim, keepdim=True) / qmax
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    q = torch.clamp(torch.round(x / safe), -qmax, qmax) * alpha
    return x + (q - x).detach()


def quantized_linear_class(torch):
    class QuantLinear(torch.nn.Module):
        """A projection of the student: fake-quantized inputs (per token) and weights (per
        output channel), and optionally its output (per token: the K/V cache)."""

        def __init__(self, linear, w_bits, a_bits, out_bits=None):
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.detach().clone())
            self.w_bits, self.a_bits, self.out_bits = w_bits, a_bits, out_bits

        def forward(self, x):
            xq = fake_quant(torch, x, self.a_bits, -1)
            wq = fake_quant(torch, self.weight, self.w_bits, 1)
            y = torch.nn.functional.linear(xq, wq)
            if self.out_bits is not None:
                y = fake_quant(torch, y, self.out_bits, -1)
            return y

    return QuantLinear


def work_train(a):
    torch = setup(a.threads)
    import copy

    teacher = load(torch, a.model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher).train()
    QuantLinear = quantized_linear_class(torch)
    for layer in student.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                lin = getattr(parent, name, None)
                if lin is not None:
                    kv = a.kv_bits if name in ("k_proj", "v_proj") else None
                    setattr(parent, name, QuantLinear(lin, a.w_bits, a.a_bits, kv))
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    g = torch.Generator().manual_seed(a.seed)
    vocab = teacher.config.vocab_size

    def step():
        x = torch.randint(3, vocab, (a.train_batch, a.seq_len), generator=g)
        with torch.no_grad():
            soft = torch.softmax(teacher(input_ids=x, use_cache=False).logits, dim=-1)
        lp = torch.log_softmax(student(input_ids=x, use_cache=False).logits, dim=-1)
        loss = -(soft * lp).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warmup (untimed): optimizer state allocated, first-call costs
    t0 = time.perf_counter()
    for _ in range(a.train_steps):
        loss = step()
    secs = time.perf_counter() - t0
    tokens = a.train_batch * a.seq_len * a.train_steps
    return {
        "train": {
            "w_bits": a.w_bits,
            "a_bits": a.a_bits,
            "kv_bits": a.kv_bits,
            "batch": a.train_batch,
            "seq_len": a.seq_len,
            "timed_steps": a.train_steps,
            "tokens": tokens,
            "seconds": secs,
            "tokens_per_second": tokens / secs,
            "last_loss": loss,
            "peak_rss_bytes": peak_rss_bytes(),
        },
        "timing": "seconds of the timed optimizer steps (teacher forward, student forward, loss, "
        "backward, AdamW) after one untimed warmup step; peak RSS of the whole process",
    }


def work_nf4(a):
    torch = setup(a.threads)
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot measure here"
        return {"nf4": None, "skipped": f"bitsandbytes not importable: {e}"}
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(a.model, "model.safetensors"))
    weights = [t for k, t in tensors.items() if k.endswith(tuple(p + ".weight" for p in PROJECTIONS))]
    F.quantize_4bit(weights[0], blocksize=64, quant_type="nf4", compress_statistics=True)
    t0 = time.perf_counter()
    for w in weights:
        F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    secs = time.perf_counter() - t0
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {
        "nf4": {
            "bitsandbytes": bitsandbytes.__version__,
            "tensors": len(weights),
            "input_dtype": str(weights[0].dtype),
            "input_bytes": nbytes,
            "seconds": secs,
            "gb_per_s": nbytes / secs / 1e9,
        },
        "timing": "seconds of quantize_4bit over the 7 projections of every layer, tensors already "
        "in memory (file read excluded); bytes as stored in the file",
    }


WORK = {"generate": work_generate, "eval": work_eval, "train": work_train, "nf4": work_nf4}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a `pipeline synth-model` (or HF) folder")
    ap.add_argument("--text", required=True, help="the evaluation text")
    ap.add_argument("--work", default="all", choices=["all", *WORK])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=4097)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--kv-bits", type=int, default=4)
    a = ap.parse_args()

    if a.work != "all":
        print(json.dumps(WORK[a.work](a)))
        return
    import torch
    import transformers

    result = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": a.threads,
        "mode": "eager, f32",
    }
    for name in WORK:
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--work", name]
        out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
        result[name] = json.loads(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
