#!/usr/bin/env python3
"""Checks a `pipeline quantize --layout bnb` folder against the real bitsandbytes + transformers.

1. Byte equality: every quantized weight's tensors (packed codes, absmax codes, nested absmax,
   code books, quant-state JSON) equal what bitsandbytes' quantize_4bit makes from the
   original weight.
2. transformers loads the folder with no conversion: the projections are Linear4bit.
3. Our dequantized weights (what `ModelFolder::load_tensors` gives for the folder, in
   --dequantized) equal bitsandbytes' dequantize_4bit exactly, and the logits of the
   transformers model with our dequantized weights equal the Linear4bit model's within --tol.
   Our Rust forward pass's logits (--logits: `tokens`, `logits`) are compared too; they differ
   from torch's by float summation order only (as the fp model does, about 3e-5), so they get
   --rust-tol.

Prints one JSON object; exits 0 when all hold, 1 otherwise, and
2 (with a line on stderr) when torch / transformers / bitsandbytes are not installed.
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", required=True, help="the model folder that was quantized")
    ap.add_argument("--quantized", required=True, help="the bnb-layout output folder")
    ap.add_argument("--logits", required=True, help="safetensors with tokens + our logits")
    ap.add_argument("--dequantized", required=True, help="safetensors of our dequantized weights")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--rust-tol", type=float, default=1e-4)
    a = ap.parse_args()
    try:
        import torch
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        import transformers
        from safetensors.torch import load_file
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot check here"
        print(f"SKIP: torch/transformers/bitsandbytes not importable: {e}", file=sys.stderr)
        sys.exit(2)

    orig = load_file(f"{a.original}/model.safetensors")
    ours = load_file(f"{a.quantized}/model.safetensors")
    suffix = ".quant_state.bitsandbytes__nf4"
    weights = sorted(k[: -len(suffix)] for k in ours if k.endswith(suffix))
    mismatches = []
    compared = 0
    for w in weights:
        state = json.loads(bytes(ours[w + suffix].numpy()).decode())
        q, st = F.quantize_4bit(
            orig[w],
            blocksize=state["blocksize"],
            compress_statistics="nested_offset" in state,
            quant_type="nf4",
        )
        want = {w: q}
        want.update({f"{w}.{k}": v for k, v in st.as_dict(packed=True).items()})
        for k, v in want.items():
            compared += 1
            mine = ours.get(k)
            if mine is None or mine.dtype != v.dtype or mine.shape != v.shape or not torch.equal(mine, v):
                mismatches.append(k)
        extra = [k for k in ours if k.startswith(w + ".") and k not in want]
        mismatches.extend(f"unexpected {k}" for k in extra)

    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.quantized, device_map="cpu", dtype=torch.float32
    )
    linear4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its own kernel on the
    # first forward, which needs every output dim to be a multiple of 32 (stories260k's are
    # not: "N must be divisible by block_n"). Its generic CPU path computes the same function
    # on any CPU, so the check takes that one everywhere.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ref = load_file(a.logits)
    tokens = ref["tokens"].to(torch.long).reshape(1, -1)
    with torch.no_grad():
        logits = model(tokens).logits[0].float()
    rust_diff = (logits - ref["logits"]).abs().max().item()

    # The plain fp32 transformers model with our dequantized weights: same arithmetic as the
    # Linear4bit forward, so any difference would come from the weights.
    deq = load_file(a.dequantized)
    weight_diff = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            theirs = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            weight_diff = max(weight_diff, (theirs - deq[name + ".weight"]).abs().max().item())
    fp = transformers.AutoModelForCausalLM.from_pretrained(a.original, dtype=torch.float32)
    sd = fp.state_dict()
    for k in sd:
        if k in deq:
            sd[k] = deq[k]
    fp.load_state_dict(sd)
    with torch.no_grad():
        fp_logits = fp(tokens).logits[0].float()
    diff = (fp_logits - logits).abs().max().item()
    r = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bnb.__version__,
        },
        "quantized_weights": len(weights),
        "tensors_compared": compared,
        "byte_mismatches": mismatches,
        "linear4bit_modules": linear4,
        "tokens": tokens.shape[1],
        "dequantized_weights_max_abs_diff": weight_diff,
        "logits_max_abs_diff": diff,
        "rust_logits_max_abs_diff": rust_diff,
    }
    print(json.dumps(r))
    ok = (
        not mismatches
        and linear4 == len(weights) > 0
        and weight_diff == 0.0
        and diff <= a.tol
        and rust_diff <= a.rust_tol
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
