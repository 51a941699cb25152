"""Solutions to lesson 02's exercises (run: python lessons/solutions/02_text_encoder.py)."""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minti.toy.bpe import train_bpe
from minti.clip import CLIPTextConfig, CLIPTextModel, quick_gelu
from minti.textual_inversion import splice
from minti.toy import world

torch.manual_seed(0)
tok = train_bpe([c for c in world.caption_corpus(2000, seed=0) if c], vocab_size=2000)
config = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
model = CLIPTextModel(config).eval().requires_grad_(False)


def encode(ids, causal=True, act=quick_gelu, inputs=None):
    """Lesson 02's encode_by_hand, with the mask and the activation as switches."""
    tm = model.text_model
    B, L = ids.shape
    h = (tm.embeddings.token_embedding.weight[ids] if inputs is None else inputs)
    h = h + tm.embeddings.position_embedding.weight[:L]
    mask = torch.full((L, L), -math.inf).triu(1) if causal else torch.zeros(L, L)
    for layer in tm.encoder.layers:
        a = layer.self_attn
        x = layer.layer_norm1(h)
        q, k, v = (p(x).view(B, L, a.num_heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        w = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask).softmax(-1)
        h = h + a.out_proj((w @ v).transpose(1, 2).reshape(B, L, -1))
        h = h + layer.mlp.fc2(act(layer.mlp.fc1(layer.layer_norm2(h))))
    return tm.final_layer_norm(h)


# 1. Without the mask every position sees the changed word: positions before it change too.
a, b = tok(["a photo of a striped orange star"]), tok(["a photo of a plain orange star"])
changed = {}
for causal in (True, False):
    diff = (encode(a, causal) - encode(b, causal)).abs().amax(-1)[0]
    changed[causal] = (diff > 1e-6).nonzero().flatten().tolist()
print(f"1. changed positions with the mask start at {changed[True][0]}; without it at {changed[False][0]} "
      f"({len(changed[False])} of 77 change)")
assert changed[True][0] == 5 and changed[False][0] == 0

# 2. F.gelu instead of QuickGELU: a small difference per layer (~0.02 at most in the activation).
gap = (encode(a) - encode(a, act=F.gelu)).abs().max().item()
print(f"2. QuickGELU -> GELU changes the output by up to {gap:.3f} (the outputs are ~1 in size)")
assert 0 < gap < 1

# 3. A placeholder at two places: its gradient is the sum of the two positions' gradients.
slot = tok.add_tokens(["<my-star>"])[0]
table = model.text_model.embeddings.token_embedding.weight
v = table[tok.token_to_id("star</w>")].clone().requires_grad_()
ids = tok(["a <my-star> next to a <my-star>"])
embeds = splice(ids, table, [slot], v[None]).detach().requires_grad_()  # a leaf per position
target = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
(model(ids, inputs_embeds=embeds) - target).pow(2).mean().backward()
per_position = embeds.grad[0][ids[0] == slot]  # [2, 64]
(model(ids, inputs_embeds=splice(ids, table, [slot], v[None])) - target).pow(2).mean().backward()
print(f"3. two positions: |grad v| = {v.grad.norm():.3e}, |sum of the positions' grads| = "
      f"{per_position.sum(0).norm():.3e}")
assert torch.allclose(v.grad, per_position.sum(0), atol=1e-8)
print("solved")
