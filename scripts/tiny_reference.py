#!/usr/bin/env python3
"""Tiny random models of the Llama 3, Mistral, Qwen3 and Phi-3 families, written as GGUF, and
what Hugging Face `transformers` / `tokenizers` compute on them: the golden data of
crates/cli/tests/families.rs.

Usage (from the repository root):
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install torch transformers tokenizers gguf numpy
  .venv-ref/bin/python scripts/tiny_reference.py [--out golden]

For each family the script
  1. trains a small byte-level BPE tokenizer (HF `tokenizers`, on the first 200,000
     characters of data/tinyshakespeare.txt plus the test texts below) with that family's
     pre-tokenizer: Llama 3's regex (`tokenizer.ggml.pre = llama-bpe`), Qwen2's regex after NFC
     (`qwen2`), or GPT-2's byte-level regex (`gpt-2`, for the Mistral and Phi-3 models: the real
     ones use SentencePiece, which the Gemma 3 test already covers against llama.cpp);
  2. builds the transformers model (`LlamaForCausalLM` with Llama 3.1 `rope_type: llama3`
     scaling, `MistralForCausalLM` with a sliding window shorter than the test sequence,
     `Qwen3ForCausalLM` with per-head q/k RMSNorm, head_dim != hidden/heads and tied
     embeddings, `Phi3ForCausalLM` with fused qkv and gate_up and a sliding window, and a
     second `Phi3ForCausalLM` with LongRoPE, partial RoPE and tied embeddings) from a fixed
     seed, with weights drawn wide enough that attention and every block matter (HF's own
     init, std 0.02, leaves logits near zero), 2-D weights rounded to f16 so the GGUF (f16
     matrices, f32 vectors, as llama.cpp's converter writes `--outtype f16`) holds exactly the
     weights the reference ran;
  3. writes golden/tiny_<family>.gguf with the tensor and metadata names of llama.cpp's
     convert_hf_to_gguf.py (q/k rows of the `llama` architecture permuted for interleaved RoPE,
     `rope_freqs.weight` from the llama3 scaling, `rope_factors_short/long.weight` and
     `rope.scaling.attn_factor` from LongRoPE, `attention.sliding_window`);
  4. records, in f32 eager attention on the CPU, the logits at every position of a fixed
     40-token sequence (golden/tiny_<family>_logits.f32, raw little-endian, seq × vocab), a
     greedy continuation (GREEDY_STEPS ids after BOS + GREEDY_PROMPT, each from a full forward,
     with its top-1 − top-2 logit margin) and the tokenizer's ids on texts with emoji, CJK,
     code, whitespace runs, contractions and digit runs (golden/tiny_reference.json). It also
     records how far the logits move when the family's special feature is switched off
     (`sensitivity`): proof that the test sequence exercises it.

Mistral's sliding window: llama.cpp's converter writes MistralForCausalLM as architecture
`llama` without the window (llama.cpp ignores it); this script writes `llama.attention.sliding_window`
so that a file can carry it, and ferrolm applies it when it is there. Phi-3: the converter writes
`phi3.attention.sliding_window` (llama.cpp currently disables it); transformers applies it,
and so does ferrolm.
"""

import argparse
import hashlib
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import tokenizers
import gguf
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKENIZE_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "CJK: 日本語のテキスト、中文文本和한국어 텍스트。",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet x = vec![1, 2, 3];\n\tprintln!(\"{:?}\", x);\n}",
    "Runs of whitespace:  two,   three,    four,\t\ttabs,\n\n\nnewlines,      six spaces.",
    "   leading spaces and trailing   ",
    "\n\nleading newlines",
    "Contractions: I'm, you're, he's, we've, they'll, I'd, DON'T, IT'S, We'Ve",
    "Digits: 1234567890 12 123 1234 3.14159 -42 1e10 0xFF 2026-12-04",
    "Mixed: café naïve résumé Ünïcödé Ελληνικά русский العربية हिन्दी",
    "Special-looking: <s> </s> <|begin_of_text|> <|im_start|>user<|im_end|> <|endoftext|>",
    "Control \u0001\u0002 chars and NBSP\u00a0here and ZWJ\u200dhere",
    "https://example.com/path?query=1&b=2#frag",
    "a",
    " ",
    "",
]

# The logits sequence: BOS (where the family adds one) + this text's ids, cut to SEQ_LEN.
LOGITS_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)
SEQ_LEN = 40
# LongRoPE families also get a sequence longer than their original context, where
# transformers switches every position to the long factors: its last LONG_TAIL positions'
# logits (golden/tiny_<family>_long_logits.f32).
LONG_SEQ_LEN = 300
LONG_TAIL = 32
# Greedy continuation recorded for the CLI check (`ferrolm generate --raw --temperature 0`).
GREEDY_PROMPT = "First Citizen:\nBefore we proceed"
GREEDY_STEPS = 8
VOCAB = 640

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    attention_dropout=0.0,
)

FAMILIES = {
    "llama3": dict(
        cls="LlamaForCausalLM",
        cfg="LlamaConfig",
        arch="llama",
        pre="llama-bpe",
        specials=["<|begin_of_text|>", "<|end_of_text|>"],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        add_bos=True,
        extra=dict(
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        # switched off for `sensitivity`
        plain=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        feature="llama3 rope scaling",
    ),
    "mistral": dict(
        cls="MistralForCausalLM",
        cfg="MistralConfig",
        arch="llama",
        pre="gpt-2",
        specials=["<unk>", "<s>", "</s>"],
        bos="<s>",
        eos="</s>",
        add_bos=True,
        extra=dict(
            num_hidden_layers=3,
            tie_word_embeddings=False,
            head_dim=16,
            sliding_window=8,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        plain=dict(sliding_window=None),
        feature="sliding window 8",
    ),
    "qwen3": dict(
        cls="Qwen3ForCausalLM",
        cfg="Qwen3Config",
        arch="qwen3",
        pre="qwen2",
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|endoftext|>",
        eos="<|im_end|>",
        add_bos=False,
        extra=dict(
            num_hidden_layers=2,
            tie_word_embeddings=True,
            head_dim=32,  # q is 4 × 32 = 128 wide, hidden 64
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        plain=None,
        feature="q/k norms",
    ),
    "phi3": dict(
        cls="Phi3ForCausalLM",
        cfg="Phi3Config",
        arch="phi3",
        pre="gpt-2",
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>"],
        bos="<s>",
        eos="<|endoftext|>",
        add_bos=True,
        extra=dict(
            num_hidden_layers=2,
            tie_word_embeddings=False,
            sliding_window=12,
            original_max_position_embeddings=256,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0),
        ),
        plain=dict(sliding_window=None),
        feature="sliding window 12",
    ),
    # Phi-3.5 / Phi-4 mini style: LongRoPE factors (the short ones apply within the original
    # context, with the attention factor sqrt(1 + ln(1024/256) / ln 256)), RoPE on 3/4 of each
    # head, tied embeddings, no window.
    "phi3_longrope": dict(
        cls="Phi3ForCausalLM",
        cfg="Phi3Config",
        arch="phi3",
        pre="gpt-2",
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>"],
        bos="<s>",
        eos="<|endoftext|>",
        add_bos=True,
        extra=dict(
            num_hidden_layers=2,
            tie_word_embeddings=True,
            sliding_window=None,
            max_position_embeddings=1024,
            original_max_position_embeddings=256,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                partial_rotary_factor=0.75,
                original_max_position_embeddings=256,
                short_factor=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0],
                long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            ),
        ),
        plain=dict(
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)
        ),
        feature="longrope short factors and attention factor",
    ),
}


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---- tokenizer --------------------------------------------------------------------------


def train_tokenizer(fam: dict, corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if fam["pre"] == "llama-bpe":
        split = pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif fam["pre"] == "qwen2":
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=fam["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Special-token strings inside text are plain text (what `ferrolm tokenize` does).
    tok.encode_special_tokens = True
    return tok


def tokenizer_metadata(tok: Tokenizer, fam: dict) -> dict:
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    types = [3 if t in fam["specials"] else 1 for t in tokens]
    return dict(tokens=tokens, merges=merges, types=types)


# ---- model ------------------------------------------------------------------------------


def build_model(fam: dict, vocab: int, bos: int, eos: int, seed: int, overrides=None):
    cfg_cls = getattr(transformers, fam["cfg"])
    kw = dict(COMMON)
    kw.update(fam["extra"])
    if overrides:
        kw.update(overrides)
    cfg = cfg_cls(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=None, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, fam["cls"])(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                # A tied head reads the embedding back: narrower, or each token mostly
                # predicts itself.
                p.copy_(torch.randn(p.shape, generator=g) * (0.4 if cfg.tie_word_embeddings else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                if "lm_head" in name:
                    p.mul_(3.0)
            if p.dim() == 2:
                p.copy_(p.half().float())
    return model


def logits_of(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row order for the `llama` architecture (RoPE pairs
    (i, i + d/2) become (2i, 2i + 1))."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rp: dict, head_dim: int) -> np.ndarray:
    """The `rope_freqs.weight` convert_hf_to_gguf.py writes for `rope_type: llama3`."""
    base = rp["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, name: str, fam: dict, model, tokmeta: dict, bos: int, eos: int):
    cfg = model.config
    arch = fam["arch"]
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"ferrolm tiny {name}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    rope_dims = int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(rope_dims)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_sliding_window(cfg.sliding_window or 0)
        rp = cfg.rope_parameters
        if rp.get("rope_type") == "longrope":
            scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings))
            )
    elif getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fam["pre"])
    w.add_token_list(tokmeta["tokens"])
    w.add_token_types(tokmeta["types"])
    w.add_token_merges(tokmeta["merges"])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(fam["add_bos"])

    def put(gname: str, t: np.ndarray):
        t = np.ascontiguousarray(t)
        w.add_tensor(gname, t.astype(np.float16) if t.ndim == 2 else t.astype(np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    if arch == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
        put("rope_freqs.weight", llama3_rope_factors(cfg.rope_parameters, head_dim))
    if cfg.rope_parameters.get("rope_type") == "longrope":
        put("rope_factors_long.weight", np.array(cfg.rope_parameters["long_factor"], dtype=np.float32))
        put("rope_factors_short.weight", np.array(cfg.rope_parameters["short_factor"], dtype=np.float32))
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        b = f"blk.{l}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        if arch == "phi3":
            put(b + "attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"])
            put(b + "ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
            continue
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, n_head), permute(k, n_kv)
        put(b + "attn_q.weight", q)
        put(b + "attn_k.weight", k)
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        if arch == "qwen3":
            put(b + "attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"])
            put(b + "attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- main -------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="golden")
    ap.add_argument("--data", default="data/tinyshakespeare.txt")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    text = Path(args.data).read_text(encoding="utf-8")[:200_000]
    corpus = [text] + TOKENIZE_TEXTS * 4

    ref = dict(
        generator="scripts/tiny_reference.py",
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            tokenizers=tokenizers.__version__,
            gguf=getattr(gguf, "__version__", "unknown"),
            numpy=np.__version__,
        ),
        seed=args.seed,
        seq_len=SEQ_LEN,
        logits_text=LOGITS_TEXT,
        families={},
    )
    for name, fam in FAMILIES.items():
        tok = train_tokenizer(fam, corpus)
        meta = tokenizer_metadata(tok, fam)
        vocab = len(meta["tokens"])
        bos, eos = meta["tokens"].index(fam["bos"]), meta["tokens"].index(fam["eos"])
        cases = []
        for t in TOKENIZE_TEXTS:
            ids = tok.encode(t, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == t or fam["pre"] == "qwen2", (name, t)
            cases.append(dict(text=t, ids=ids))
        ids = tok.encode(LOGITS_TEXT, add_special_tokens=False).ids
        ids = ([bos] if fam["add_bos"] else []) + ids
        assert len(ids) >= SEQ_LEN, (name, len(ids))
        ids = ids[:SEQ_LEN]

        model = build_model(fam, vocab, bos, eos, args.seed)
        logits = logits_of(model, ids)
        sensitivity = None
        if fam["plain"] is not None:
            plain = build_model(fam, vocab, bos, eos, args.seed, fam["plain"])
            sensitivity = float(np.abs(logits_of(plain, ids) - logits).max())
        else:  # Qwen3: q/k norm weights set to ones (HF's init) instead of the drawn ones
            with torch.no_grad():
                saved = {}
                for n_, p in model.named_parameters():
                    if "q_norm" in n_ or "k_norm" in n_:
                        saved[n_] = p.clone()
                        p.fill_(1.0)
                sensitivity = float(np.abs(logits_of(model, ids) - logits).max())
                for n_, p in model.named_parameters():
                    if n_ in saved:
                        p.copy_(saved[n_])

        prompt = ([bos] if fam["add_bos"] else []) + tok.encode(GREEDY_PROMPT, add_special_tokens=False).ids
        seq, steps = list(prompt), []
        for _ in range(GREEDY_STEPS):
            last = logits_of(model, seq)[-1]
            top2 = np.argsort(-last)[:2]
            steps.append(dict(id=int(top2[0]), margin=float(last[top2[0]] - last[top2[1]])))
            seq.append(int(top2[0]))

        long = None
        rp = fam["extra"].get("rope_parameters", {})
        if rp.get("rope_type") == "longrope":
            long_ids = ([bos] if fam["add_bos"] else []) + tok.encode(text[:4000], add_special_tokens=False).ids
            assert len(long_ids) >= LONG_SEQ_LEN, (name, len(long_ids))
            long_ids = long_ids[:LONG_SEQ_LEN]
            assert LONG_SEQ_LEN > rp["original_max_position_embeddings"]
            long_logits = logits_of(model, long_ids)[-LONG_TAIL:]
            # The same sequence with the short factors in the long ones' place: what a model
            # that kept the short factors past the original context would compute.
            same = dict(fam["extra"])
            same["rope_parameters"] = dict(rp, long_factor=rp["short_factor"])
            short_model = build_model(fam, vocab, bos, eos, args.seed, dict(rope_parameters=same["rope_parameters"]))
            long_sensitivity = float(np.abs(logits_of(short_model, long_ids)[-LONG_TAIL:] - long_logits).max())
            long_bytes = long_logits.astype("<f4").tobytes()
            (out / f"tiny_{name}_long_logits.f32").write_bytes(long_bytes)
            long = dict(
                ids=long_ids,
                tail=LONG_TAIL,
                logits_file=f"tiny_{name}_long_logits.f32",
                logits_sha256=sha256(long_bytes),
                sensitivity=long_sensitivity,
            )
            print(f"{name}: long sequence of {LONG_SEQ_LEN}: with the short factors max|Δ| {long_sensitivity:.3f}",
                  file=sys.stderr)

        gguf_path = out / f"tiny_{name}.gguf"
        write_gguf(gguf_path, name, fam, model, meta, bos, eos)
        logits_bytes = logits.astype("<f4").tobytes()
        (out / f"tiny_{name}_logits.f32").write_bytes(logits_bytes)
        cfg = model.config
        ref["families"][name] = dict(
            hf_class=fam["cls"],
            gguf=gguf_path.name,
            gguf_sha256=sha256(gguf_path.read_bytes()),
            gguf_architecture=fam["arch"],
            tokenizer_pre=fam["pre"],
            vocab_size=vocab,
            bos_id=bos,
            eos_id=eos,
            add_bos=fam["add_bos"],
            config=dict(
                layers=cfg.num_hidden_layers,
                hidden=cfg.hidden_size,
                heads=cfg.num_attention_heads,
                kv_heads=cfg.num_key_value_heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                ffn=cfg.intermediate_size,
                rope_parameters=cfg.rope_parameters,
                sliding_window=getattr(cfg, "sliding_window", None),
                tie_word_embeddings=cfg.tie_word_embeddings,
                rms_norm_eps=cfg.rms_norm_eps,
            ),
            ids=ids,
            logits_file=f"tiny_{name}_logits.f32",
            logits_sha256=sha256(logits_bytes),
            logits_abs_max=float(np.abs(logits).max()),
            logits_std=float(logits.std()),
            feature=fam["feature"],
            sensitivity=sensitivity,
            tokenize=cases,
            greedy=dict(prompt=GREEDY_PROMPT, prompt_ids=prompt, steps=steps),
        )
        if long is not None:
            ref["families"][name]["long"] = long
        print(
            f"{name}: vocab {vocab}, {gguf_path.stat().st_size} bytes, logits std {logits.std():.3f}, "
            f"max|logit| {np.abs(logits).max():.2f}; without {fam['feature']}: max|Δ| {sensitivity:.3f}",
            file=sys.stderr,
        )
    (out / "tiny_reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
