#!/usr/bin/env python3
"""Tiny checkpoints of every supported architecture and config form, written by transformers
itself, with transformers' logits and greedy tokens as the reference (tests/hf_archs.rs).

    python3 scripts/hf_arch_reference.py OUT_DIR [SHARED_DIR]

For each case OUT_DIR/<case>/ holds the model folder (config.json as transformers writes it,
safetensors, the stories260k tokenizer) and reference.safetensors:
  a.tokens [T] int64, a.logits [T, vocab] f32 (full forward),
  a.prompt [P] int64, a.greedy [N] int64 (greedy continuation of the prompt),
  a.logits_w4a8kv4 [T, vocab] f32: the same forward with the fake quantizers of
  ../shared/DESIGN.md put into transformers' own modules (weights per output channel, the
  projections' inputs per token, V per token at v_proj's output, K per token after RoPE).
Exit code 3 (with a message) when torch or transformers is missing.
"""
import json
import os
import shutil
import sys

try:
    import torch
    import transformers
    from safetensors.torch import save_file
except ImportError as e:  # the Rust test skips on this code
    print(f"skip: {e}", file=sys.stderr)
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "..", "..", "shared")
TOKENIZER = os.path.join(SHARED, "models", "stories260k")
VOCAB = 512  # the stories260k tokenizer's, so every folder is a complete usable model


def common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def cases():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    rope = lambda **p: dict(rope_parameters=p)  # noqa: E731
    return {
        # transformers 5 writes rope_theta inside rope_parameters (the bug of issue 15).
        "llama_rope_parameters": (LlamaConfig, common(**rope(rope_type="default", rope_theta=100000.0)), {}),
        # Llama 3.2: llama3 scaling, tied embeddings, head_dim 32 from 64 / 2 heads.
        "llama32_llama3": (
            LlamaConfig,
            common(
                num_attention_heads=2,
                num_key_value_heads=1,
                tie_word_embeddings=True,
                **rope(
                    rope_type="llama3",
                    rope_theta=500000.0,
                    factor=32.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ),
            ),
            {},
        ),
        "llama_linear": (LlamaConfig, common(**rope(rope_type="linear", rope_theta=10000.0, factor=4.0)), {}),
        "llama_yarn": (
            LlamaConfig,
            common(**rope(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)),
            {},
        ),
        # Bias on q, k, v and o_proj.
        "llama_attention_bias": (LlamaConfig, common(attention_bias=True), {}),
        "mistral": (MistralConfig, common(sliding_window=96), {}),
        "qwen2": (Qwen2Config, common(), {}),
        # Qwen3: explicit head_dim (4 x 32 = 128 != hidden 64), q/k norms, tied like Qwen3-0.6B.
        "qwen3": (Qwen3Config, common(head_dim=32, tie_word_embeddings=True), {}),
        "llama_tied": (LlamaConfig, common(tie_word_embeddings=True), {}),
        "llama_bf16": (LlamaConfig, common(), {"dtype": torch.bfloat16}),
        "llama_sharded": (LlamaConfig, common(num_hidden_layers=4), {"max_shard_size": "60KB"}),
    }


def randomize(model, seed):
    """transformers initialises biases to zero and norms to one; random values test them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def fake_quant(x, bits, dim=-1):
    """Symmetric MinMax fake quantization over `dim`, round half to even (DESIGN.md)."""
    qmax = 2 ** (bits - 1) - 1
    alpha = x.abs().amax(dim=dim, keepdim=True) / qmax
    safe = torch.where(alpha == 0, torch.ones_like(alpha), alpha)
    q = torch.clamp(torch.round(x / safe), -qmax, qmax) * safe
    return torch.where(alpha == 0, torch.zeros_like(q), q)


def w4a8kv4_logits(model, tokens):
    """Logits with W4 (per channel), A8 (per token) and KV4 (per token, post-RoPE K)."""
    import copy
    import importlib

    m = copy.deepcopy(model)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    hooks = []
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.split(".")[-1] in names:
                mod.weight.copy_(fake_quant(mod.weight, 4))
                hooks.append(mod.register_forward_pre_hook(lambda _, a: (fake_quant(a[0], 8),)))
                if name.endswith("v_proj"):
                    hooks.append(mod.register_forward_hook(lambda _, a, y: fake_quant(y, 4)))
    # K is quantized where the cache stores it: after RoPE, across all KV heads of a token.
    module = importlib.import_module(type(m).__module__)
    original = module.apply_rotary_pos_emb

    def rope_then_quant(q, k, cos, sin, *args, **kw):
        q, k = original(q, k, cos, sin, *args, **kw)
        b, h, t, d = k.shape
        flat = k.transpose(1, 2).reshape(b, t, h * d)
        return q, fake_quant(flat, 4).reshape(b, t, h, d).transpose(1, 2)

    module.apply_rotary_pos_emb = rope_then_quant
    try:
        with torch.no_grad():
            return m(tokens[None]).logits[0].float()
    finally:
        module.apply_rotary_pos_emb = original
        for h in hooks:
            h.remove()


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    for i, (name, (cls, cfg_kw, save_kw)) in enumerate(cases().items()):
        d = os.path.join(out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        cfg = cls(**cfg_kw)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        randomize(model, 1000 + i)
        dtype = save_kw.pop("dtype", None)
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(d, safe_serialization=True, **save_kw)
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(os.path.join(TOKENIZER, f), d)
        # The reference is the saved checkpoint as transformers loads it, computed in f32.
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(7 + i)
        tokens = torch.cat([torch.tensor([1]), torch.randint(3, VOCAB, (47,), generator=g)])
        prompt = tokens[:6]
        with torch.no_grad():
            logits = ref(tokens[None]).logits[0].float()
        quantized = w4a8kv4_logits(ref, tokens)
        with torch.no_grad():
            ref.generation_config.eos_token_id = None
            greedy = ref.generate(
                prompt[None],
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
            )[0, prompt.numel():]
        save_file(
            {
                "a.tokens": tokens.to(torch.int64).contiguous(),
                "a.logits": logits.contiguous(),
                "a.logits_w4a8kv4": quantized.contiguous(),
                "a.prompt": prompt.to(torch.int64).clone(),
                "a.greedy": greedy.to(torch.int64).contiguous(),
            },
            os.path.join(d, "reference.safetensors"),
        )
        files = sorted(os.listdir(d))
        print(json.dumps({"case": name, "files": files, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
