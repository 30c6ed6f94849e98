#!/usr/bin/env python3
"""Check that a ferrolm LoRA adapter is a valid Hugging Face PEFT adapter: PEFT applied to the
base model gives the same logits as `ferrolm merge` folding it into the base.

For each adapter tested:
  * the base GGUF is loaded by transformers (which dequantizes it to f32 and un-permutes the
    q/k rows into Hugging Face order) and the adapter by `PeftModel.from_pretrained`; every
    tensor of adapter_model.safetensors must land in the model unchanged;
  * logits on a few prompts (a chat-formatted one and plain text), f32;
  * `ferrolm merge BASE ADAPTER --type f32 -o merged.gguf`, loaded by transformers the same
    way, logits on the same token ids;
  * reported: max |Δlogit| PEFT vs ferrolm-merged (must be within the tolerance), base without
    adapter vs PEFT (the adapter's effect, for scale), and PEFT vs PEFT's own merge_and_unload
    (PyTorch's f32 re-association noise, for reference).

Adapters:
  * synthetic (always): rank 4, alpha 8, every target (q,k,v,o,gate,up,down_proj), A uniform
    (Kaiming-like), B ~ N(0, 0.05), written here in PEFT format with shapes from the model
    config. Large B makes a q/k row-order mistake show as a large difference;
  * mis-permuted (always, expected to FAIL): the same adapter, but the file given to ferrolm has
    its q/k lora_B rows moved from GGUF to HF order, so ferrolm's reorder on load cancels out --
    it simulates a ferrolm that applied no q/k permutation. PEFT reads the correct file. The
    check passes only if this variant exceeds the tolerance by far;
  * --adapter DIR (optional): a real adapter, e.g. from `ferrolm finetune`.

Tolerance: rel_tol (default 1e-3) x the logit scale (max |logit| of PEFT's logits on the
prompts). Both sides are f32 and differ only in summation order (W + s·B·A folded in f32 by
ferrolm vs x·Wᵀ + s·(x·Aᵀ)·Bᵀ in PyTorch) and in how each dequantizes Q4_1: relative errors of
order 1e-6..1e-5 after 30 layers, well under 1e-3, while a row-order mistake with this B moves
logits by O(1) of the scale.

Run (CPU, a few minutes; needs torch, transformers, peft, gguf, safetensors):

    HF_HUB_OFFLINE=1 nice -n 10 /work/torch-venv/bin/python scripts/peft_check.py \\
        [--base ~/.cache/ferrolm/models/SmolLM2-135M-Instruct.Q4_1.gguf] \\
        [--adapter /tmp/ft1/adapter] [--ferrolm target/release/ferrolm] [--threads 2]

Exit status: 0 if every real/synthetic adapter is within tolerance and the mis-permuted one is
not; 1 otherwise.
"""
import argparse
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import warnings  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


def default_base():
    home = os.environ.get("FERROLM_HOME") or os.path.expanduser("~/.cache/ferrolm")
    for d in (home, "/tmp/fhome"):
        found = sorted(glob.glob(os.path.join(d, "models", "*.gguf")))
        if found:
            return found[0]
    return None


def load_gguf(path):
    from transformers import AutoModelForCausalLM
    d, name = os.path.split(os.path.abspath(path))
    try:
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    except TypeError:  # transformers < 4.56
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32)
    return m.eval()  # already f32 (transformers refuses .float() on GGUF-loaded models)


@torch.no_grad()
def logits_of(model, ids):
    return [model(input_ids=x).logits[0].float() for x in ids]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def argmax_agree(a, b):
    n = sum(x.shape[0] for x in a)
    same = sum((x.argmax(-1) == y.argmax(-1)).sum().item() for x, y in zip(a, b))
    return same / n


def shapes(cfg):
    """(out, in) of each target matrix, from the model config."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
    }, hd


def module_path(layer, target):
    part = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{target}"


def gguf_to_hf_rows(b, heads, hd):
    """Rows of a (heads·hd) × r matrix from GGUF order to HF order: GGUF row h·hd+2i+j is HF
    row h·hd+j·hd/2+i (llama.cpp `permute`)."""
    out = torch.empty_like(b)
    for h in range(heads):
        for i in range(hd // 2):
            for j in range(2):
                out[h * hd + j * (hd // 2) + i] = b[h * hd + 2 * i + j]
    return out


def write_adapter(d, tensors, r, alpha, targets, base_name):
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "revision": None,
    }
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def synthetic(cfg, seed, r=4):
    g = torch.Generator().manual_seed(seed)
    sh, hd = shapes(cfg)
    t = {}
    for layer in range(cfg.num_hidden_layers):
        for tgt in TARGETS:
            n_out, n_in = sh[tgt]
            bound = 1.0 / n_in ** 0.5
            t[module_path(layer, tgt) + ".lora_A.weight"] = (
                torch.rand(r, n_in, generator=g) * 2 - 1) * bound
            t[module_path(layer, tgt) + ".lora_B.weight"] = torch.randn(
                n_out, r, generator=g) * 0.05
    return t, r


def mispermuted(tensors, cfg):
    _, hd = shapes(cfg)
    out = dict(tensors)
    for k, v in tensors.items():
        if k.endswith("lora_B.weight"):
            if ".q_proj." in k:
                out[k] = gguf_to_hf_rows(v, cfg.num_attention_heads, hd)
            elif ".k_proj." in k:
                out[k] = gguf_to_hf_rows(v, cfg.num_key_value_heads, hd)
    return out


def peft_logits(base, adapter_dir, ids):
    """PEFT's logits with the adapter, PEFT merge_and_unload's logits, and a check that every
    tensor of the file was loaded unchanged."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    sd = pm.state_dict()
    file = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    problems = []
    for k, v in file.items():
        mk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        if mk not in sd:
            problems.append(f"{k}: not in the PEFT model")
        elif sd[mk].shape != v.shape or not torch.equal(sd[mk].float(), v.float()):
            problems.append(f"{k}: loaded {tuple(sd[mk].shape)} differs from file {tuple(v.shape)}")
    n_lora = sum(1 for k in sd if ".lora_" in k)
    if n_lora != len(file):
        problems.append(f"PEFT model has {n_lora} LoRA tensors, file has {len(file)}")
    lp = logits_of(pm, ids)
    merged = pm.merge_and_unload().eval()
    lm = logits_of(merged, ids)
    del pm, merged
    return lp, lm, problems


def ferrolm_merge(args, adapter_dir, out):
    cmd = [args.ferrolm, "merge", args.base, adapter_dir, "--type", "f32", "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=default_base(), help="base GGUF (default: the default model)")
    ap.add_argument("--adapter", action="append", default=[],
                    help="PEFT adapter dir from ferrolm finetune (repeatable; default: synthetic only)")
    ap.add_argument("--ferrolm", default=os.path.join(REPO, "target", "release", "ferrolm"))
    ap.add_argument("--rel-tol", type=float, default=1e-3,
                    help="tolerance as a fraction of max |logit| (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="keep merged GGUFs and synthetic adapters here")
    args = ap.parse_args()
    if not args.base or not os.path.exists(args.base):
        sys.exit("no base GGUF: pass --base (or run `ferrolm pull`)")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    work = args.workdir or tempfile.mkdtemp(prefix="peft_check_")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    d, name = os.path.split(os.path.abspath(args.base))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    base = load_gguf(args.base)
    cfg = base.config
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             if isinstance(p, list) else p for p in PROMPTS]
    ids = [torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    print(f"base {args.base}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}; prompts of "
          f"{[x.shape[1] for x in ids]} tokens")
    sh, hd = shapes(cfg)
    for tgt, s in sh.items():  # config-derived shapes must match the loaded modules
        part = "self_attn" if tgt in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        w = getattr(getattr(base.model.layers[0], part), tgt).weight
        assert tuple(w.shape) == s, (tgt, tuple(w.shape), s)
    base_logits = logits_of(base, ids)

    cases = []  # (label, peft file, ferrolm file, expect_pass)
    for a in args.adapter:
        cases.append((f"adapter {a}", a, a, True))
    syn, r = synthetic(cfg, args.seed)
    syn_dir = os.path.join(work, "synthetic")
    write_adapter(syn_dir, syn, r, 2.0 * r, TARGETS, name)
    cases.append(("synthetic r=4 alpha=8 all targets, B~N(0,0.05)", syn_dir, syn_dir, True))
    bad_dir = os.path.join(work, "mispermuted")
    write_adapter(bad_dir, mispermuted(syn, cfg), r, 2.0 * r, TARGETS, name)
    cases.append(("synthetic, q/k B rows NOT reordered for ferrolm (must fail)",
                  syn_dir, bad_dir, False))

    ok = True
    rows = []
    peft_cache = {}
    for label, pdir, fdir, expect in cases:
        if pdir not in peft_cache:
            peft_cache[pdir] = peft_logits(base, pdir, ids)
        lp, lpm, problems = peft_cache[pdir]
        merged_path = os.path.join(work, "merged.gguf")
        ferrolm_merge(args, fdir, merged_path)
        merged = load_gguf(merged_path)
        lf = logits_of(merged, ids)
        del merged
        os.remove(merged_path)
        scale = max(x.abs().max().item() for x in lp)
        tol = args.rel_tol * scale
        dfm = max_diff(lp, lf)
        passed = dfm <= tol and not problems
        verdict = "PASS" if passed == expect else "FAIL"
        if passed != expect:
            ok = False
        rows.append(label)
        print(f"\n== {label}")
        for p in problems[:5]:
            print(f"   load problem: {p}")
        if problems:
            print(f"   ({len(problems)} load problems)")
        print(f"   logit scale (max |logit|, PEFT)     {scale:10.4f}   tolerance {tol:.2e} "
              f"({args.rel_tol:g} x scale)")
        print(f"   max |Δ| base (no adapter) vs PEFT  {max_diff(base_logits, lp):10.3e}   "
              f"(the adapter's effect; argmax agree {argmax_agree(base_logits, lp):.3f})")
        print(f"   max |Δ| PEFT vs PEFT merge_and_unload {max_diff(lp, lpm):7.3e}   "
              f"(PyTorch f32 noise floor)")
        print(f"   max |Δ| PEFT vs ferrolm merge      {dfm:10.3e}   "
              f"({dfm / scale:.1e} of scale; argmax agree {argmax_agree(lp, lf):.3f})")
        print(f"   -> within tolerance: {passed}; expected {expect}: {verdict}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'OK' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
