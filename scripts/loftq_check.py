#!/usr/bin/env python3
"""Cross-checks our LoftQ against peft's (`peft.utils.loftq_utils.loftq_init`, bitsandbytes NF4).

    python3 scripts/loftq_check.py TEACHER_DIR BASE_DIR

BASE_DIR is `pipeline quantize --model TEACHER_DIR --format nf4 --loftq-rank R --loftq-iters 1`
(no double quantization, lora_alpha = R: peft's LoftQ setting). For every matrix with adapters,
peft's loftq_init runs on the same weight; the base's NF4 codes and absmax must equal the
bitsandbytes quantization peft makes, byte for byte, and our (alpha / r) B A must equal peft's
lora_B @ lora_A within float tolerance (the product: SVD signs are arbitrary). Prints one JSON
line with the largest differences. Exit code 3 (with a message) when torch, bitsandbytes or
peft is missing.

peft's loftq_init moves the weight to "cuda" (or "xpu"); here both are mapped to the CPU, where
bitsandbytes 0.50 quantizes NF4 with the same numbers.
"""
import json
import os
import sys

try:
    import torch
    from safetensors.torch import load_file
    import bitsandbytes as bnb
    from peft.utils import loftq_utils
except ImportError as e:
    print(f"skip: {e}", file=sys.stderr)
    sys.exit(3)


def on_cpu(fn):
    """Wraps a `.to` method so that cuda / xpu devices become the CPU."""

    def to(self, *args, **kwargs):
        def fix(d):
            if isinstance(d, (str, torch.device)) and torch.device(d).type in ("cuda", "xpu"):
                return torch.device("cpu")
            return d

        args = tuple(fix(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = fix(kwargs["device"])
        return fn(self, *args, **kwargs)

    return to


def main():
    teacher, base = sys.argv[1], sys.argv[2]
    header = json.load(open(os.path.join(base, "quantize.json")))
    loftq = header.get("loftq")
    assert loftq and header["format"] == "nf4" and not header["double_quant"], header
    assert loftq["iters"] == 1 and loftq["alpha"] == loftq["rank"], loftq
    rank, scale = loftq["rank"], loftq["alpha"] / loftq["rank"]
    torch.Tensor.to = on_cpu(torch.Tensor.to)
    bnb.nn.Params4bit.to = on_cpu(bnb.nn.Params4bit.to)
    seen = []
    dequantize = bnb.functional.dequantize_4bit

    def capture(a, quant_state=None, *args, **kwargs):
        seen.append((a.clone(), quant_state))
        return dequantize(a, quant_state, *args, **kwargs)

    bnb.functional.dequantize_4bit = capture
    w = load_file(os.path.join(teacher, "model.safetensors"))
    q = load_file(os.path.join(base, "model.safetensors"))
    ad = load_file(os.path.join(base, "loftq_adapters.safetensors"))
    worst_product, checked = 0.0, 0
    for name in sorted(ad):
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")]
        weight = w[module + ".weight"].float()
        seen.clear()
        deq, lora_a, lora_b = loftq_utils.loftq_init(weight, num_bits=4, reduced_rank=rank, num_iter=1)
        assert len(seen) == 1, f"{module}: peft quantized {len(seen)} times"
        codes, state = seen[0]
        ours = q[module + ".weight"]
        assert torch.equal(ours.flatten(), codes.flatten().to(torch.uint8)), f"{module}: NF4 codes differ from peft's"
        assert torch.equal(q[module + ".weight.absmax"], state.absmax), f"{module}: absmax differs from peft's"
        theirs = lora_b @ lora_a
        mine = scale * (ad[module + ".lora_B.weight"] @ ad[module + ".lora_A.weight"])
        rel = ((mine - theirs).norm() / theirs.norm()).item()
        assert rel < 1e-3, f"{module}: B A differs from peft's by {rel:.2e} (relative Frobenius)"
        worst_product = max(worst_product, rel)
        checked += 1
    assert checked > 0, "no LoftQ adapters in the base"
    print(json.dumps({"matrices": checked, "codes_equal": True, "max_product_rel_diff": worst_product}))


if __name__ == "__main__":
    main()
