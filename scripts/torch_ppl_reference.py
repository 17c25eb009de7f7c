"""Perplexity of a HF Llama folder under DESIGN.md fake quantization, computed with PyTorch and
transformers, to show how sensitive a ppl.json entry is to float32 evaluation order.

usage: python3 scripts/torch_ppl_reference.py MODEL_DIR TEXT W_BITS A_BITS KV_BITS eager|sdpa [VARIANTS]
VARIANTS (space separated, optional) swap one of torch's kernels for the order our CPU code uses:
  norm     RMSNorm mean as a sequential f32 sum (candle's reduce) instead of ATen's vectorised sum
  softmax  attention softmax with libm-rounded exp, sequential sum and a division
  silu     SiLU with libm-rounded exp
  rope64   RoPE cos/sin from f64 angles, rounded once
Protocol: BOS + whole file, windows of max_position_embeddings + 1 ids stepping by
max_position_embeddings, every window scored from scratch (../shared/data/README.md).
"""
import sys, json, math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama as ml
torch.set_num_threads(1)
model_dir, text_path, w, a, kv, attn = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
variant = sys.argv[7] if len(sys.argv) > 7 else ""

def fq(x, bits):  # per last-dim row, symmetric minmax, half-even
    if bits >= 16: return x
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=-1, keepdim=True)
    alpha = amax / qmax
    safe = torch.where(alpha == 0, torch.ones_like(alpha), alpha)
    q = torch.clamp(torch.round(x / safe), -qmax, qmax) * alpha
    return q

m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation=attn)
m.eval()
names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for layer in m.model.layers:
    for n in names:
        lin = getattr(layer.self_attn, n, None) or getattr(layer.mlp, n)
        with torch.no_grad():
            lin.weight.copy_(fq(lin.weight, w))
        lin.register_forward_pre_hook(lambda mod, args: (fq(args[0], a),))
    if kv < 16:
        layer.self_attn.v_proj.register_forward_hook(lambda mod, args, out: fq(out, kv))
orig = ml.apply_rotary_pos_emb
def rope_q(q, k, cos, sin, *rest, **kw):
    q2, k2 = orig(q, k, cos, sin, *rest, **kw)
    if kv < 16:
        b, h, t, d = k2.shape
        k2 = fq(k2.transpose(1, 2).reshape(b, t, h * d), kv).reshape(b, t, h, d).transpose(1, 2)
    return q2, k2
ml.apply_rotary_pos_emb = rope_q
if "rope64" in variant:
    rot = m.model.rotary_emb
    def rot_fwd(x, position_ids, *a_, **k_):
        hd = m.config.hidden_size // m.config.num_attention_heads if getattr(m.config, "head_dim", None) is None else m.config.head_dim
        inv = 1.0 / (m.config.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        f = position_ids[0].double()[:, None] * inv[None, :]
        emb = torch.cat([f, f], -1)
        return emb.cos().float()[None], emb.sin().float()[None]
    rot.forward = rot_fwd


from tokenizers import Tokenizer
def seqsum(x):  # sequential f32 sum over the last dim, as candle's CPU reduce does
    acc = torch.zeros(x.shape[:-1], dtype=torch.float32)
    for j in range(x.shape[-1]):
        acc = acc + x[..., j]
    return acc.unsqueeze(-1)
if "norm" in variant:
    def norm_fwd(self, h):
        v = seqsum(h * h) * (1.0 / h.shape[-1])
        r = 1.0 / torch.sqrt(v + self.variance_epsilon)
        return (h * r) * self.weight
    ml.LlamaRMSNorm.forward = norm_fwd
if "silu" in variant:
    for layer in m.model.layers:
        class Silu(torch.nn.Module):
            def forward(self, x):
                return x / (1.0 + torch.exp((-x).double()).float())
        layer.mlp.act_fn = Silu()
if "softmax" in variant:
    import torch.nn.functional as F
    orig_sm = F.softmax
    def sm(x, dim=-1, dtype=None, **kw):
        mx = x.amax(-1, keepdim=True)
        e = torch.exp((x - mx).double()).float()
        return e / seqsum(e)
    ml.nn.functional.softmax = sm
tok = Tokenizer.from_file(model_dir + "/tokenizer.json")
text = open(text_path, encoding="utf-8").read()
ids = [m.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids
W = m.config.max_position_embeddings + 1
nll, n = 0.0, 0
with torch.no_grad():
    for s in range(0, len(ids) - 1, W - 1):
        win = ids[s:s + W]
        if len(win) < 2: break
        x = torch.tensor([win])
        logits = m(x).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1)
        tgt = torch.tensor(win[1:])
        nll -= lp[torch.arange(len(tgt)), tgt].sum().item()
        n += len(tgt)
print(json.dumps({"attn": attn, "w": w, "a": a, "kv": kv, "ppl": math.exp(nll / n), "tokens": n}))
