#!/usr/bin/env python3
"""Loads an exported QLoRA student the way its users will, and writes the logits as references
for `pipeline bench logits` (tests/qlora_cli.rs).

    python3 scripts/peft_check.py EXPORT_DIR TOKENS_FIXTURE OUT_DIR

EXPORT_DIR is `pipeline export --format peft` output (base/ + adapter/) and, beside it,
EXPORT_DIR-hf (`--format hf`, the merged folder). Writes OUT_DIR/peft.safetensors (the NF4 base
with bitsandbytes + the adapter with peft, on the CPU) and OUT_DIR/merged.safetensors
(transformers on the merged folder), each with `a.tokens` and `a.logits`.
Exit code 3 (with a message) when torch, transformers, bitsandbytes or peft is missing.
"""
import json
import os
import sys

try:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    import bitsandbytes
    from peft import PeftModel
except ImportError as e:
    print(f"skip: {e}", file=sys.stderr)
    sys.exit(3)


def main():
    export, fixture, out = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(out, exist_ok=True)
    tokens = load_file(fixture)["a.tokens"].to(torch.int64)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(export, "base"), dtype=torch.float32)
    kinds = {type(m).__name__ for m in base.modules()}
    assert "Linear4bit" in kinds, f"the base did not load as bitsandbytes 4-bit layers: {kinds}"
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its own kernel, which
    # needs output dims that are multiples of 32 (stories260k's are not); its generic CPU path
    # computes the same function on any CPU (as scripts/bnb_check.py does).
    for m in base.modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, os.path.join(export, "adapter")).eval()
    with torch.no_grad():
        logits = model(tokens[None]).logits[0].float()
    save_file({"a.tokens": tokens.clone(), "a.logits": logits.contiguous()}, os.path.join(out, "peft.safetensors"))
    peft_logits = logits
    merged = AutoModelForCausalLM.from_pretrained(export + "-hf/model", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(tokens[None]).logits[0].float()
    save_file({"a.tokens": tokens.clone(), "a.logits": logits.contiguous()}, os.path.join(out, "merged.safetensors"))
    # The merge itself: each merged weight against bitsandbytes' dequantized base + peft's
    # scale * B @ A, and the merged model's logits against peft's (both computed by torch).
    weight_diff = 0.0
    merged_params = dict(merged.named_parameters())
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A") or "default" not in m.lora_A:
            continue
        w = bitsandbytes.functional.dequantize_4bit(m.base_layer.weight.data, m.base_layer.weight.quant_state).float()
        w = w + m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
        key = name.replace("base_model.model.", "", 1) + ".weight"
        weight_diff = max(weight_diff, (merged_params[key] - w).abs().max().item())
    result = {
        "merged_weight_max_abs_diff": weight_diff,
        "merged_vs_peft_logits_max_abs_diff": (logits - peft_logits).abs().max().item(),
    }
    with open(os.path.join(out, "check.json"), "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
