#!/usr/bin/env python3
"""Golden reference for one ferrolm training step: crates/train/tests/fixtures/one_step.json.

ferrolm's `train` crate has a hand-written forward and backward for its Llama training
architecture. This script computes the same step in float64 with PyTorch autograd on a tiny
model, so the Rust tests can check the loss, every gradient, the global gradient norm and the
weights after one clipped AdamW step without Python.

Model (the Llama architecture ferrolm trains; HF Llama parameter names, row-major [out, in])
-------------------------------------------------------------------------------------------
  model.embed_tokens.weight                      [V, C]   (tied: logits = h E^T, no lm_head)
  model.layers.{i}.input_layernorm.weight        [C]
  model.layers.{i}.self_attn.q_proj.weight       [H*hd, C]
  model.layers.{i}.self_attn.k_proj.weight       [KV*hd, C]
  model.layers.{i}.self_attn.v_proj.weight       [KV*hd, C]
  model.layers.{i}.self_attn.o_proj.weight       [C, H*hd]
  model.layers.{i}.post_attention_layernorm.weight [C]
  model.layers.{i}.mlp.gate_proj.weight          [F, C]
  model.layers.{i}.mlp.up_proj.weight            [F, C]
  model.layers.{i}.mlp.down_proj.weight          [C, F]
  model.norm.weight                              [C]

  x = E[idx]; per layer: h = rmsnorm(x) * w_in, rmsnorm(x) = x / sqrt(mean(x^2) + eps);
  q, k, v = h Wq^T, h Wk^T, h Wv^T as (B, T, heads, hd); RoPE on q and k, INTERLEAVED pairs
  (GGUF / llama.cpp "norm" rope): (a, b) = (x[2i], x[2i+1]), angle = pos * theta^(-2i/hd),
  x[2i] = a cos - b sin, x[2i+1] = a sin + b cos, pos = 0..T-1; query head h reads kv head
  h // (H/KV); causal softmax(q k^T / sqrt(hd)) v; x += o Wo^T; h2 = rmsnorm(x) * w_post;
  x += Wdown(silu(Wgate h2) * (Wup h2)); logits = (rmsnorm(x) * w_norm) E^T;
  loss = mean cross-entropy of logits[b, t] against tokens[b, t+1] over all B*T positions
  (inputs tokens[:, :T], targets tokens[:, 1:]).

Step: clip the gradients to global L2 norm 1.0 (torch.nn.utils.clip_grad_norm_: coefficient
min(1, max_norm / (norm + 1e-6))), then torch.optim.AdamW (step 1, bias-corrected, decoupled
weight decay p *= 1 - lr*wd on 2-D tensors only: the embedding and the matrices, not the norm
weights). The same step is recomputed by hand in numpy and must agree.

Fixture config: V=11, C=16, L=2, H=4, KV=2 (hd=4), F=24, T=8, B=3, rope_theta 1e4, eps 1e-5.
Values from numpy default_rng(1234), drawn in the order of the table above (layer 0's tensors,
then layer 1's): matrices and the embedding normal(0, 0.3), norm weights 1 + normal(0, 0.1); then
the tokens, rng.integers(0, V, (B, T+1)).

Fixture fields: config, tokens, weights {name: {shape, data}}, loss, logits_first_row
(logits[0, 0, :]), grads {name: flat} (unclipped), grad_norm (global L2 norm of the unclipped
gradients), adamw {lr, beta1, beta2, eps, weight_decay, grad_clip}, weights_after {name: flat},
loss_after (same tokens, weights_after), notes. All numbers are float64, written with repr.

Self-checks (the script fails if one does not hold): an independent plain-loop numpy forward
gives the same loss and logits; the autograd gradients agree with central finite differences
on one random coordinate of each of the 20 tensors; the hand-written AdamW step agrees with
torch's.

How to run (from the repository root)
-------------------------------------
    /work/torch-venv/bin/python scripts/train_reference.py [--out PATH]

It rewrites the fixture byte-identically (sorted keys, repr floats, one thread) on the same
machine and library versions; elsewhere, last-bit differences in float64 are possible.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "crates", "train", "tests", "fixtures", "one_step.json")

CONFIG = {
    "vocab_size": 11,
    "dim": 16,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 4,
    "ffn_dim": 24,
    "seq_len": 8,
    "batch_size": 3,
    "rope_theta": 10000.0,
    "rope_layout": "interleaved",
    "rms_eps": 1e-5,
    "tied_embeddings": True,
}
ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
         "grad_clip": 1.0}
SEED = 1234


def param_specs(cfg):
    """(name, shape, is_norm) in the order the weights are drawn and listed."""
    V, C, H, KV, hd, Fd = (cfg["vocab_size"], cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"],
                           cfg["head_dim"], cfg["ffn_dim"])
    specs = [("model.embed_tokens.weight", (V, C), False)]
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (C,), True),
            (p + "self_attn.q_proj.weight", (H * hd, C), False),
            (p + "self_attn.k_proj.weight", (KV * hd, C), False),
            (p + "self_attn.v_proj.weight", (KV * hd, C), False),
            (p + "self_attn.o_proj.weight", (C, H * hd), False),
            (p + "post_attention_layernorm.weight", (C,), True),
            (p + "mlp.gate_proj.weight", (Fd, C), False),
            (p + "mlp.up_proj.weight", (Fd, C), False),
            (p + "mlp.down_proj.weight", (C, Fd), False),
        ]
    specs.append(("model.norm.weight", (C,), True))
    return specs


def make_inputs(cfg):
    rng = np.random.default_rng(SEED)
    weights = {}
    for name, shape, is_norm in param_specs(cfg):
        if is_norm:
            weights[name] = 1.0 + rng.normal(0.0, 0.1, shape)
        else:
            weights[name] = rng.normal(0.0, 0.3, shape)
    tokens = rng.integers(0, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_len"] + 1))
    return weights, tokens


# ----------------------------------------------------------------------------- torch float64

def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """x: (B, T, heads, hd), interleaved pairs."""
    T, hd = x.shape[1], x.shape[3]
    i = torch.arange(hd // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / hd)[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def forward(W, tokens, cfg):
    """Returns (loss, logits). W: name -> float64 tensor; tokens: (B, T+1) int64 tensor."""
    H, KV, hd, eps = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["rms_eps"]
    idx, tgt = tokens[:, :-1], tokens[:, 1:]
    B, T = idx.shape
    E = W["model.embed_tokens.weight"]
    x = E[idx]
    kv_of_head = [h // (H // KV) for h in range(H)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).view(B, T, KV, hd)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(B, T, KV, hd)
        q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
        k, v = k[:, :, kv_of_head, :], v[:, :, kv_of_head, :]
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        o = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * hd)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h2 = rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = h2 @ W[p + "mlp.gate_proj.weight"].T
        up = h2 @ W[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    logits = rmsnorm(x, W["model.norm.weight"], eps) @ E.T
    loss = F.cross_entropy(logits.reshape(B * T, -1), tgt.reshape(-1))
    return loss, logits


# ----------------------------------------------------------------------------- plain loops

def forward_loops(Wn, tokens, cfg):
    """Independent numpy forward written position by position; returns (loss, logits)."""
    H, KV, hd, eps, theta = (cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"],
                             cfg["rms_eps"], cfg["rope_theta"])
    B, T = tokens.shape[0], tokens.shape[1] - 1
    E = Wn["model.embed_tokens.weight"]

    def norm(v, w):
        return v / math.sqrt(sum(float(a) * float(a) for a in v) / len(v) + eps) * w

    def rot(vec, pos):
        out = vec.copy()
        for i in range(hd // 2):
            ang = pos * math.pow(theta, -2.0 * i / hd)
            a, b = vec[2 * i], vec[2 * i + 1]
            out[2 * i] = a * math.cos(ang) - b * math.sin(ang)
            out[2 * i + 1] = a * math.sin(ang) + b * math.cos(ang)
        return out

    total, logits_all = 0.0, np.zeros((B, T, E.shape[0]))
    for b in range(B):
        xs = [E[tokens[b, t]].copy() for t in range(T)]
        for i in range(cfg["n_layers"]):
            p = f"model.layers.{i}."
            Wq, Wk, Wv, Wo = (Wn[p + "self_attn." + n + "_proj.weight"] for n in "qkvo")
            hs = [norm(x, Wn[p + "input_layernorm.weight"]) for x in xs]
            qs = [(Wq @ h).reshape(H, hd) for h in hs]
            ks = [(Wk @ h).reshape(KV, hd) for h in hs]
            vs = [(Wv @ h).reshape(KV, hd) for h in hs]
            qs = [np.stack([rot(qs[t][j], t) for j in range(H)]) for t in range(T)]
            ks = [np.stack([rot(ks[t][j], t) for j in range(KV)]) for t in range(T)]
            new = []
            for t in range(T):
                heads = []
                for j in range(H):
                    g = j // (H // KV)
                    s = [float(qs[t][j] @ ks[u][g]) / math.sqrt(hd) for u in range(t + 1)]
                    m = max(s)
                    e = [math.exp(z - m) for z in s]
                    heads.append(sum(e[u] / sum(e) * vs[u][g] for u in range(t + 1)))
                x = xs[t] + Wo @ np.concatenate(heads)
                h2 = norm(x, Wn[p + "post_attention_layernorm.weight"])
                gate = Wn[p + "mlp.gate_proj.weight"] @ h2
                up = Wn[p + "mlp.up_proj.weight"] @ h2
                act = np.array([gv / (1.0 + math.exp(-gv)) for gv in gate]) * up
                new.append(x + Wn[p + "mlp.down_proj.weight"] @ act)
            xs = new
        for t in range(T):
            lg = E @ norm(xs[t], Wn["model.norm.weight"])
            logits_all[b, t] = lg
            m = max(lg)
            lse = m + math.log(sum(math.exp(z - m) for z in lg))
            total += lse - lg[tokens[b, t + 1]]
    return total / (B * T), logits_all


# ----------------------------------------------------------------------------- step

def adamw_by_hand(weights, grads, grad_norm, hp):
    """One clipped AdamW step from zero moments (step 1), numpy float64."""
    coef = min(1.0, hp["grad_clip"] / (grad_norm + 1e-6))
    b1, b2, lr, eps = hp["beta1"], hp["beta2"], hp["lr"], hp["eps"]
    out = {}
    for name, w in weights.items():
        g = grads[name] * coef
        m = (1.0 - b1) * g
        v = (1.0 - b2) * g * g
        wd = hp["weight_decay"] if w.ndim == 2 else 0.0
        p = w * (1.0 - lr * wd)
        denom = np.sqrt(v) / math.sqrt(1.0 - b2) + eps
        out[name] = p - (lr / (1.0 - b1)) * m / denom
    return out


def flat(t):
    return [float(v) for v in np.asarray(t, dtype=np.float64).ravel()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = CONFIG
    assert cfg["dim"] == cfg["n_heads"] * cfg["head_dim"]
    assert cfg["n_heads"] % cfg["n_kv_heads"] == 0

    w_np, tok_np = make_inputs(cfg)
    names = list(w_np)
    tokens = torch.from_numpy(tok_np.astype(np.int64))
    params = {n: torch.tensor(w_np[n], dtype=torch.float64, requires_grad=True) for n in names}

    loss, logits = forward(params, tokens, cfg)
    loss.backward()
    grads = {n: params[n].grad.detach().clone() for n in names}

    # Check 1: the independent loop forward.
    loss_loops, logits_loops = forward_loops(w_np, tok_np, cfg)
    d_loss = abs(loss_loops - loss.item())
    d_logits = float(np.abs(logits_loops - logits.detach().numpy()).max())
    print(f"loss {loss.item():.17g}; loop forward differs by {d_loss:.2e} (loss), "
          f"{d_logits:.2e} (max logit)")
    assert d_loss < 1e-12 and d_logits < 1e-12, "loop forward disagrees"

    # Check 2: central finite differences, one random coordinate of every tensor.
    rng = np.random.default_rng(7)
    h = 1e-5
    worst = 0.0
    with torch.no_grad():
        for n in names:
            j = int(rng.integers(0, params[n].numel()))
            p = params[n].view(-1)
            orig = p[j].item()
            p[j] = orig + h
            lp = forward(params, tokens, cfg)[0].item()
            p[j] = orig - h
            lm = forward(params, tokens, cfg)[0].item()
            p[j] = orig
            fd = (lp - lm) / (2 * h)
            g = grads[n].view(-1)[j].item()
            rel = abs(fd - g) / max(abs(fd), abs(g), 1e-8)
            worst = max(worst, rel)
    print(f"finite differences: max relative error {worst:.2e} over {len(names)} coordinates")
    assert worst < 1e-6, "autograd disagrees with finite differences"

    # The step: clip to global norm, AdamW with decay on 2-D tensors only.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), ADAMW["grad_clip"]))
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in names if params[n].dim() == 2],
          "weight_decay": ADAMW["weight_decay"]},
         {"params": [params[n] for n in names if params[n].dim() != 2], "weight_decay": 0.0}],
        lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
        foreach=False, fused=False)
    opt.step()
    after = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        loss_after = forward(after, tokens, cfg)[0].item()

    # Check 3: the step by hand.
    by_hand = adamw_by_hand(w_np, {n: grads[n].numpy() for n in names}, grad_norm, ADAMW)
    d_step = max(float(np.abs(by_hand[n] - after[n].numpy()).max()) for n in names)
    print(f"grad_norm {grad_norm:.6g} (clip coefficient "
          f"{min(1.0, ADAMW['grad_clip'] / (grad_norm + 1e-6)):.6g}); hand-written AdamW "
          f"differs by {d_step:.2e}; loss_after {loss_after:.17g}")
    assert d_step < 1e-14, "hand-written AdamW disagrees with torch"

    fixture = {
        "config": cfg,
        "tokens": tok_np.tolist(),
        "weights": {n: {"shape": list(w_np[n].shape), "data": flat(w_np[n])} for n in names},
        "loss": loss.item(),
        "logits_first_row": flat(logits.detach()[0, 0]),
        "grads": {n: flat(grads[n]) for n in names},
        "grad_norm": grad_norm,
        "adamw": ADAMW,
        "weights_after": {n: flat(after[n]) for n in names},
        "loss_after": loss_after,
        "notes": (
            "Written by scripts/train_reference.py (float64, PyTorch autograd). Inputs are "
            "tokens[:, :seq_len], targets tokens[:, 1:]; loss is the mean cross-entropy over "
            "batch_size*seq_len positions. grads are unclipped; grad_norm is their global L2 "
            "norm. weights_after = one step: grads *= min(1, grad_clip/(grad_norm+1e-6)); "
            "m = (1-beta1) g; v = (1-beta2) g^2; p *= 1 - lr*weight_decay for 2-D tensors "
            "only; p -= lr/(1-beta1) * m / (sqrt(v)/sqrt(1-beta2) + eps). RoPE is interleaved "
            "(pairs 2i, 2i+1); query head h uses kv head h // (n_heads/n_kv_heads); "
            "logits = final_norm(x) @ embed^T (tied)."),
    }
    text = json.dumps(fixture, sort_keys=True, separators=(",", ":")) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(text)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
