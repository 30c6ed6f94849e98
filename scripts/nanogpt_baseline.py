#!/usr/bin/env python3
"""PyTorch baseline for `ferrolm train`: nanoGPT's shakespeare_char CPU run, side by side.

What this is
------------
An independent re-implementation (written from scratch, no code copied) that mirrors the
configuration of nanoGPT's `model.py` / `train.py` for the CPU example in nanoGPT's README
(`config/train_shakespeare_char.py` with `--device=cpu --compile=False --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0`), for which nanoGPT reports a val loss of about 1.88:

  data      character level: vocab = sorted(set(text)) (65 chars for tinyshakespeare),
            first 90% of the text is train, the last 10% is val; a batch is `batch` random
            offsets drawn with torch.randint(len(data) - block, (batch,)), x = data[i:i+T],
            y = data[i+1:i+1+T]
  model     --arch gpt (nanoGPT's GPT): token + learned position embeddings, 4 pre-LayerNorm
            blocks (LayerNorm without bias, eps 1e-5), causal self-attention through
            F.scaled_dot_product_attention, 4x MLP with exact GELU, no biases anywhere,
            lm_head tied to the token embedding; init normal(0, 0.02) for every Linear and
            Embedding, residual projections (attn.c_proj, mlp.c_proj) normal(0, 0.02/sqrt(2*L))
            --arch llama (ferrolm's training architecture, same hyperparameters and loop):
            token embedding only (no position embedding), RMSNorm (eps 1e-5, weight 1),
            interleaved RoPE (theta 10000, pairs (2i, 2i+1) as in GGUF/llama.cpp), causal SDPA,
            n_kv_heads = n_heads, SwiGLU MLP of width 344 (about the parameters of the 4x GELU
            MLP), tied embeddings, vocab 65 + 3 unused rows = 68 (ferrolm's char tokenizer adds
            <|endoftext|>, <|im_start|>, <|im_end|> after the 65 chars); init normal(0, 0.02),
            o_proj / down_proj normal(0, 0.02/sqrt(2*L)), norm weights 1
  optimizer AdamW(betas=(0.9, 0.99), eps=1e-8, fused=False), weight decay 0.1 on parameters
            with dim >= 2 only (embeddings and matrices), 0 on the rest; grad clip 1.0
            (torch.nn.utils.clip_grad_norm_)
  schedule  lr 1e-3, linear warmup lr*(it+1)/(warmup+1) for it < 100, then cosine from 1e-3 to
            min_lr 1e-4 at lr_decay_iters 2000 (min_lr after that), as nanoGPT's get_lr
  eval      estimate_loss: mean loss over `--eval-iters` random batches of train and of val
            (model.eval(), no grad); by default only once, after the last iteration
  seed      torch.manual_seed(1337) before the model is built

One iteration is what nanoGPT times as `dt`: set lr, forward, fetch the next batch (nanoGPT
prefetches it between forward and backward), backward, clip, AdamW step, zero_grad. The reported
time per iteration is the wall time of those iterations only (evals and data prep are outside
the clock): ms_per_iter is the median over iterations 10..iters-1 (the first 10 are warm-up),
ms_per_iter_mean the mean over the same iterations.

`params` in the JSON counts the tied embedding once and, as nanoGPT's get_num_params() reports
it, excludes the position embedding (gpt: 795,904 = nanoGPT's "0.80M"; llama has no position
embedding: 800,384); `params_total` counts everything.

How to run (from the repository root; PyTorch in /work/torch-venv, or any venv with torch and
numpy)
---------------------------------------------------------------------------------------------
    /work/torch-venv/bin/python scripts/nanogpt_baseline.py --threads 2 --json
    /work/torch-venv/bin/python scripts/nanogpt_baseline.py --threads 2 --arch llama --json

Progress goes to stderr every 100 iterations; with --json the last stdout line is
{"arch", "iters", "train_loss", "val_loss", "ms_per_iter", "ms_per_iter_mean", "params",
"params_total", "threads", "eval_iters", "loadavg_before", "loadavg_after", "torch"}.
The machine's cores are shared with other tenants: PyTorch's OpenMP threads spin at
barriers, so a run while something else uses a core is several times slower. Check
loadavg_before / loadavg_after and compare with ferrolm only when both ran in a quiet window.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tinyshakespeare.txt")
# ferrolm's char tokenizer appends these after the characters (ids 65, 66, 67 here).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------- data

def load_char_data(path):
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    ids = np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))
    n_train = int(0.9 * len(ids))
    train = torch.from_numpy(ids[:n_train].copy())
    val = torch.from_numpy(ids[n_train:].copy())
    return chars, train, val


def make_batcher(splits, block, batch):
    def get_batch(split):
        data = splits[split]
        starts = torch.randint(len(data) - block, (batch,))
        x = torch.stack([data[s:s + block] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + 1 + block] for s in starts.tolist()])
        return x, y
    return get_batch


# ----------------------------------------------------------------------------- nanoGPT's GPT

class LayerNormNoBias(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class GPTAttention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hd = C // self.n_heads
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.n_heads, hd).transpose(1, 2)
        v = v.view(B, T, self.n_heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.ln_1 = LayerNormNoBias(dim)
        self.attn = GPTAttention(dim, n_heads)
        self.ln_2 = LayerNormNoBias(dim)
        self.mlp = GPTMLP(dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layers, n_heads, dim):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.h = nn.ModuleList(GPTBlock(dim, n_heads) for _ in range(n_layers))
        self.ln_f = LayerNormNoBias(dim)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else std
                nn.init.normal_(p, mean=0.0, std=s)

    def non_embedding_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, targets):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied lm_head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ----------------------------------------------------------------------------- ferrolm's Llama

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(T, hd, theta=10000.0):
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # theta^(-2i/hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # (T, hd/2)
    return ang.cos().float(), ang.sin().float()


def rope_interleaved(x, cos, sin):
    """x: (B, T, heads, hd); rotates the pairs (x[2i], x[2i+1]) by pos * theta^(-2i/hd)."""
    xp = x.unflatten(-1, (-1, 2))
    a, b = xp[..., 0], xp[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


class LlamaAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(n_heads * self.hd, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = rope_interleaved(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin)
        k = rope_interleaved(self.k_proj(x).view(B, T, self.n_kv_heads, self.hd), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # query head h reads kv head h // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = LlamaMLP(dim, ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, vocab, dim, n_layers, n_heads, n_kv_heads, ffn):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            LlamaLayer(dim, n_heads, n_kv_heads, ffn) for _ in range(n_layers))
        self.norm = RMSNorm(dim)


class Llama(nn.Module):
    """Parameter names are the HF Llama ones (model.embed_tokens.weight, ...), no lm_head."""

    def __init__(self, vocab, block, n_layers, n_heads, dim, ffn, n_kv_heads=None):
        super().__init__()
        self.model = LlamaBody(vocab, dim, n_layers, n_heads, n_kv_heads or n_heads, ffn)
        cos, sin = rope_tables(block, dim // n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith("o_proj.weight") or name.endswith("down_proj.weight")
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layers) if residual else std)

    def non_embedding_params(self):
        return sum(p.numel() for p in self.parameters())  # no position embedding

    def forward(self, idx, targets):
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = F.linear(self.model.norm(x), self.model.embed_tokens.weight)  # tied
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ----------------------------------------------------------------------------- training

def lr_at(it, lr, min_lr, warmup, decay_iters):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def estimate_loss(model, get_batch, eval_iters):
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(split)
            losses[k] = model(x, y).item()
        out[split] = losses.mean().item()
    model.train()
    return out


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--eval-iters", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also evaluate every N iterations (outside the clock); 0 = only at the end")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--arch", choices=["gpt", "llama"], default="gpt")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--json", action="store_true")
    # nanoGPT's shakespeare_char CPU configuration
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=344, help="SwiGLU width (--arch llama)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup-iters", type=int, default=100)
    ap.add_argument("--lr-decay-iters", type=int, default=2000)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    load_before = loadavg()

    chars, train, val = load_char_data(args.data)
    get_batch = make_batcher({"train": train, "val": val}, args.block, args.batch)

    torch.manual_seed(args.seed)
    if args.arch == "gpt":
        model = GPT(len(chars), args.block, args.n_layer, args.n_head, args.n_embd)
    else:
        model = Llama(len(chars) + len(SPECIAL_TOKENS), args.block, args.n_layer, args.n_head,
                      args.n_embd, args.ffn)
    params_total = sum(p.numel() for p in model.parameters())
    params = model.non_embedding_params()

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, fused=False)

    print(f"arch={args.arch} vocab={len(chars)} params={params} (total {params_total}) "
          f"threads={torch.get_num_threads()} loadavg={load_before}", file=sys.stderr)

    times = []
    x, y = get_batch("train")
    for it in range(args.iters):
        if args.eval_every and it > 0 and it % args.eval_every == 0:
            ev = estimate_loss(model, get_batch, args.eval_iters)
            print(f"eval it {it}: train {ev['train']:.4f} val {ev['val']:.4f}", file=sys.stderr)
        t0 = time.perf_counter()
        lr = lr_at(it, args.lr, args.min_lr, args.warmup_iters, args.lr_decay_iters)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if it % 100 == 0 or it == args.iters - 1:
            recent = times[-100:]
            print(f"iter {it}: loss {loss.item():.4f}, lr {lr:.2e}, "
                  f"{1e3 * statistics.median(recent):.1f} ms/iter (median of last {len(recent)})",
                  file=sys.stderr)

    ev = estimate_loss(model, get_batch, args.eval_iters)
    timed = times[10:] if len(times) > 10 else times
    result = {
        "arch": args.arch,
        "iters": args.iters,
        "train_loss": round(ev["train"], 4),
        "val_loss": round(ev["val"], 4),
        "ms_per_iter": round(1e3 * statistics.median(timed), 2),
        "ms_per_iter_mean": round(1e3 * statistics.fmean(timed), 2),
        "params": params,
        "params_total": params_total,
        "threads": args.threads,
        "eval_iters": args.eval_iters,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "torch": torch.__version__,
    }
    print(f"final: train {ev['train']:.4f} val {ev['val']:.4f}, "
          f"{result['ms_per_iter']} ms/iter median, {result['ms_per_iter_mean']} mean, "
          f"loadavg {result['loadavg_after']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
