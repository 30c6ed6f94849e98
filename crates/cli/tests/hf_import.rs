//! The Hugging Face importer (`ferrolm_train::hf`) on real directories that `transformers`
//! wrote (`scripts/hf_import_reference.py` → `golden/hf_tiny_<family>/`), and on the default
//! model written out as a Hugging Face directory by this test.
//!
//! - Llama 3, Mistral (sharded), Qwen3, Phi-3, Phi-3 LongRoPE: the imported GGUF equals, key for
//!   key and tensor for tensor, `golden/tiny_<family>.gguf` — the file `scripts/tiny_reference.py`
//!   wrote from the same weights with llama.cpp's converter conventions (q/k permutation,
//!   `rope_freqs`, LongRoPE factors, window, tokenizer metadata) — and its logits are within
//!   0.02 of transformers' (`golden/tiny_<family>_logits.f32`).
//! - Gemma 3 (bf16, norms `1 + w`, two local layers of three): logits within 0.02 of
//!   transformers' (`golden/hf_tiny_gemma3_logits.f32`); without the window they move by 7.
//! - SmolLM2 (the default model) dequantized and written as `config.json` + f32
//!   `model.safetensors` (q/k rows un-permuted) + `tokenizer.json` + `tokenizer_config.json` +
//!   `chat_template.jinja`:
//!   imported back, every tensor is bit-identical to the dequantized original, the tokenizer
//!   metadata equal, and greedy generation the same as on the f32 GGUF `ferrolm quantize`
//!   makes of the original.
//! - Bad directories: each refused with a message naming the problem, no output file.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use ferrolm_gguf::{GgmlType, GgufFile, Value};
use ferrolm_models::{Batch, KvCache, Model, Scratch, SeqSpan};

const FAMILIES: [&str; 5] = ["llama3", "mistral", "qwen3", "phi3", "phi3_longrope"];

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn import(dir: &Path) -> GgufFile {
    ferrolm_models::quant::set_batch_invariant(false);
    ferrolm_train::hf::open_as_gguf(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Logits at every position of `tokens`, in one batch.
fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let n = tokens.len();
    let bs = 16;
    let mut kv = KvCache::new(model.cfg(), bs, n.div_ceil(bs));
    let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
    let mut s = Scratch::new();
    let positions: Vec<u32> = (0..n as u32).collect();
    let seqs = [SeqSpan {
        start: 0,
        len: n,
        block_table: &table,
    }];
    let want: Vec<usize> = (0..n).collect();
    let batch = Batch {
        tokens,
        positions: &positions,
        seqs: &seqs,
        logits_for: &want,
        adapters: &[],
    };
    model.forward(&batch, &mut kv, &mut s).unwrap();
    s.logits[..n * model.cfg().vocab_size].to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Every key but `general.name` and every tensor of `want` is in `got` with the same value
/// (the RoPE factors, computed in f32 on both sides by different code, within 1e-6). `got` may
/// also carry a chat template (the Qwen3 directory has one; the hand-written GGUF has none).
fn assert_same_gguf(name: &str, got: &GgufFile, want: &GgufFile) {
    let keys = |g: &GgufFile| -> Vec<String> {
        let mut k: Vec<String> = g
            .metadata
            .keys()
            .filter(|&k| k != "general.name" && k != "tokenizer.chat_template")
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(got), keys(want), "{name}: metadata keys");
    for (k, v) in &want.metadata {
        if k == "general.name" {
            continue;
        }
        assert_eq!(got.get(k), Some(v), "{name}: metadata `{k}`");
    }
    let mut names: Vec<&str> = got.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut want_names: Vec<&str> = want.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    want_names.sort_unstable();
    assert_eq!(names, want_names, "{name}: tensor names");
    for wt in &want.tensors {
        let gt = got.tensor(&wt.name).unwrap();
        assert_eq!(gt.dims, wt.dims, "{name}: {} dims", wt.name);
        assert_eq!(gt.ggml_type, wt.ggml_type, "{name}: {} type", wt.name);
        let (gb, wb) = (
            got.tensor_bytes(gt).unwrap(),
            want.tensor_bytes(wt).unwrap(),
        );
        if wt.name.starts_with("rope_") {
            let d = max_diff(&f32s(&gb), &f32s(&wb));
            assert!(d <= 1e-6, "{name}: {} differs by {d}", wt.name);
        } else {
            assert!(gb == wb, "{name}: tensor {} differs", wt.name);
        }
    }
}

#[test]
fn imported_directories_equal_the_converter_gguf_and_transformers_logits() {
    let r = json(&golden("tiny_reference.json"));
    for name in FAMILIES {
        let f = &r["families"][name];
        let got = import(&golden(&format!("hf_tiny_{name}")));
        let want = GgufFile::open(golden(&format!("tiny_{name}.gguf"))).unwrap();
        assert_same_gguf(name, &got, &want);
        if name == "qwen3" {
            let tc = json(&golden("hf_tiny_qwen3/tokenizer_config.json"));
            assert_eq!(
                got.get_str("tokenizer.chat_template").unwrap(),
                tc["chat_template"].as_str().unwrap()
            );
        }

        let model = Model::load(&got, &mut |_, _| {}).unwrap();
        let tokens = ids(&f["ids"]);
        let want = f32s(&std::fs::read(golden(f["logits_file"].as_str().unwrap())).unwrap());
        let d = max_diff(&logits(&model, &tokens), &want);
        eprintln!("{name}: imported, max |Δ| logits against transformers {d:.4}");
        assert!(d <= 0.02, "{name}: max |Δ| {d}");
    }
}

/// Gemma 3 has no hand-written GGUF to compare with: its logits are the check. The window is
/// exercised (without it the reference moves by `sensitivity`, far above the tolerance).
#[test]
fn imported_gemma3_logits_equal_transformers() {
    let r = json(&golden("hf_import_reference.json"));
    let f = &r["families"]["gemma3"];
    assert!(f["sensitivity"].as_f64().unwrap() > 1.0);
    let g = import(&golden(f["dir"].as_str().unwrap()));
    assert_eq!(g.architecture().unwrap(), "gemma3");
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::BF16
    );
    let model = Model::load(&g, &mut |_, _| {}).unwrap();
    let want = f32s(&std::fs::read(golden(f["logits_file"].as_str().unwrap())).unwrap());
    let d = max_diff(&logits(&model, &ids(&f["ids"])), &want);
    eprintln!("gemma3: imported, max |Δ| logits against transformers {d:.4}");
    assert!(d <= 0.02, "gemma3: max |Δ| {d}");
}

/// `--model HF_DIR` on the CLI: generation and the chat template from tokenizer_config.json.
#[test]
fn generate_and_quantize_accept_a_hugging_face_directory() {
    let r = json(&golden("tiny_reference.json"));
    let f = &r["families"]["llama3"];
    let gr = &f["greedy"];
    let out = ferrolm()
        .args(["generate", "--model"])
        .arg(golden("hf_tiny_llama3"))
        .args(["--raw", "--json", "--temperature", "0", "--max-tokens", "4"])
        .args(["--prompt", gr["prompt"].as_str().unwrap()])
        .output()
        .unwrap();
    let v = json_of(&out);
    assert_eq!(ids(&v["prompt_ids"]), ids(&gr["prompt_ids"]));
    let want: Vec<u32> = gr["steps"].as_array().unwrap()[..4]
        .iter()
        .map(|s| s["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids(&v["ids"]), want);

    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("qwen3-q8_0.gguf");
    let out = ferrolm()
        .arg("quantize")
        .arg(golden("hf_tiny_qwen3"))
        .arg(&q)
        .args([
            "--type",
            "q8_0",
            "--ctx",
            "128",
            "--calibration-tokens",
            "256",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = GgufFile::open(&q).unwrap();
    assert_eq!(g.architecture().unwrap(), "qwen3");
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert!(g
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));
}

// ---- bad input ------------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// `ferrolm quantize DIR OUT` fails (not a panic), names every needle, and leaves no OUT.
fn refused(dir: &Path, needles: &[&str]) {
    let out_file = dir.parent().unwrap().join("out.gguf");
    let out = ferrolm()
        .arg("quantize")
        .arg(dir)
        .arg(&out_file)
        .args(["--type", "q8_0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {}", dir.display());
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!out_file.exists(), "an output file was left behind");
}

/// A broken copy of `golden/hf_tiny_llama3`, made by `edit`.
fn broken(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("model");
    copy_dir(&golden("hf_tiny_llama3"), &d);
    edit(&d);
    t
}

fn edit_config(d: &Path, key: &str, v: serde_json::Value) {
    let p = d.join("config.json");
    let mut j = json(&p);
    j[key] = v;
    std::fs::write(&p, serde_json::to_vec(&j).unwrap()).unwrap();
}

/// Rewrite one tensor's header entry of `model.safetensors`.
fn edit_safetensors_header(d: &Path, tensor: &str, field: &str, v: serde_json::Value) {
    let p = d.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    h[tensor][field] = v;
    let mut hb = serde_json::to_vec(&h).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend(hb);
    out.extend_from_slice(&b[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

#[test]
fn bad_hugging_face_directories_are_refused_with_a_reason() {
    let t = broken(|d| std::fs::remove_file(d.join("config.json")).unwrap());
    refused(&t.path().join("model"), &["no config.json"]);
    let t = broken(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    refused(&t.path().join("model"), &["no *.safetensors"]);
    let t = broken(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    refused(
        &t.path().join("model"),
        &["neither tokenizer.json nor tokenizer.model"],
    );
    let t = broken(|d| edit_config(d, "architectures", serde_json::json!(["GPT2LMHeadModel"])));
    refused(
        &t.path().join("model"),
        &["GPT2LMHeadModel", "LlamaForCausalLM", "Gemma3ForCausalLM"],
    );
    let t = broken(|d| edit_config(d, "num_hidden_layers", serde_json::json!(3)));
    refused(
        &t.path().join("model"),
        &["model.layers.2.input_layernorm.weight", "missing"],
    );
    let t = broken(|d| edit_config(d, "intermediate_size", serde_json::json!(256)));
    refused(&t.path().join("model"), &["mlp.down_proj.weight", "shape"]);
    let t = broken(|d| {
        edit_safetensors_header(d, "model.norm.weight", "dtype", serde_json::json!("I32"))
    });
    refused(
        &t.path().join("model"),
        &["model.norm.weight", "I32", "F16"],
    );
    let t = broken(|d| {
        let p = d.join("tokenizer.json");
        let mut j = json(&p);
        j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁"});
        std::fs::write(&p, serde_json::to_vec(&j).unwrap()).unwrap();
    });
    refused(&t.path().join("model"), &["SentencePiece", "Metaspace"]);
    let t = broken(|d| {
        let mut j = json(&d.join("config.json"));
        j["rope_parameters"]["rope_type"] = serde_json::json!("yarn");
        std::fs::write(d.join("config.json"), serde_json::to_vec(&j).unwrap()).unwrap();
    });
    refused(&t.path().join("model"), &["yarn", "not supported"]);
    // A Unigram SentencePiece vocabulary: ferrolm and llama.cpp would tokenize it as BPE.
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("model");
    copy_dir(&golden("hf_tiny_spm_json"), &d);
    let p = d.join("tokenizer.json");
    let mut j = json(&p);
    j["model"] = serde_json::json!({"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]]});
    std::fs::write(&p, serde_json::to_vec(&j).unwrap()).unwrap();
    refused(&d, &["Unigram", "SentencePiece BPE"]);
}

/// SentencePiece vocabularies (`scripts/hf_spm_reference.py`): a directory with only
/// `tokenizer.model` (Llama 2 style) and one with only the `tokenizer.json` that
/// `transformers` converts from it, each imported as `tokenizer.ggml.model = llama`, tokenize
/// every recorded text (spaces, digits, emoji and CJK by byte fallback, accents, an empty text)
/// to the ids SentencePiece gives, BOS first, and decode back to the text (after the prefix
/// space).
#[test]
fn sentencepiece_directories_tokenize_as_sentencepiece() {
    let r = json(&golden("hf_spm_reference.json"));
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for name in ["hf_tiny_spm_model", "hf_tiny_spm_json"] {
        let g = import(&golden(name));
        assert_eq!(
            g.get_str("tokenizer.ggml.model").unwrap(),
            "llama",
            "{name}"
        );
        let types = g.get_i64_array("tokenizer.ggml.token_type").unwrap();
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len(), r["n_vocab"].as_u64().unwrap() as usize);
        // Byte-fallback pieces are BYTE (6), `<s>` CONTROL (3), `<unk>` UNKNOWN (2).
        let ty = |s: &str| types[tokens.iter().position(|t| *t == s).unwrap()];
        assert_eq!((ty("<0x41>"), ty("<s>"), ty("<unk>")), (6, 3, 2), "{name}");
        let tok = ferrolm_tokenizer::Tokenizer::from_gguf(&g).unwrap();
        assert!(tok.add_bos, "{name}");
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let mut got = vec![tok.bos_id.unwrap()];
            got.extend(tok.encode(text, false).unwrap());
            assert_eq!(got, want, "{name}: {text:?}");
            // Decoding keeps the `▁` put before the text as a space.
            let d = tok.decode(&got[1..]);
            assert_eq!(d.strip_prefix(' ').unwrap_or(&d), text, "{name}: decode");
        }
    }
}

// ---- the default model, out to Hugging Face and back ---------------------------------------

/// A safetensors file of f32 tensors.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + data.len() * 4]}),
        );
        off += data.len() * 4;
    }
    let mut hb = serde_json::to_vec(&header).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend(hb);
    for (_, _, data) in tensors {
        out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    }
    std::fs::write(path, out).unwrap();
}

/// GGUF `llama` q/k rows (interleaved RoPE pairs) back to Hugging Face's half split.
fn unpermute(x: &[f32], n_head: usize, rows: usize) -> Vec<f32> {
    ferrolm_train::base::hf_rows(x, n_head, rows / n_head, x.len() / rows, true)
}

/// SmolLM2 (GGUF `llama`) as a Hugging Face directory: f32 weights dequantized from the file.
fn write_hf_dir(g: &GgufFile, dir: &Path) -> Vec<(String, Vec<f32>)> {
    let u = |k: &str| g.get_u64(&format!("llama.{k}")).unwrap() as usize;
    let (n_head, n_kv, dim) = (
        u("attention.head_count"),
        u("attention.head_count_kv"),
        u("embedding_length"),
    );
    let vocab = g.tensor("token_embd.weight").unwrap().dims[1] as usize;
    let mut tensors = Vec::new();
    let mut originals = Vec::new();
    for t in &g.tensors {
        let v = ferrolm_models::linear::dequantize(g, t).unwrap();
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let hf = match t.name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_owned(),
            "output_norm.weight" => "model.norm.weight".to_owned(),
            "output.weight" => "lm_head.weight".to_owned(),
            n => {
                let (l, part) = n.strip_prefix("blk.").unwrap().split_once('.').unwrap();
                let p = match part {
                    "attn_norm.weight" => "input_layernorm.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("model.layers.{l}.{p}")
            }
        };
        let data = if t.name.ends_with("attn_q.weight") {
            unpermute(&v, n_head, shape[0])
        } else if t.name.ends_with("attn_k.weight") {
            unpermute(&v, n_kv, shape[0])
        } else {
            v.clone()
        };
        originals.push((t.name.clone(), v));
        tensors.push((hf, shape, data));
    }
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": dim,
        "intermediate_size": u("feed_forward_length"),
        "num_hidden_layers": u("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": u("context_length"),
        "rms_norm_eps": g.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap(),
        "rope_theta": g.get_f64("llama.rope.freq_base").unwrap(),
        "vocab_size": vocab,
        "tie_word_embeddings": !g.has_tensor("output.weight"),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    let types = g.get_i64_array("tokenizer.ggml.token_type").unwrap();
    let merges = g.get_str_array("tokenizer.ggml.merges").unwrap();
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3)
        .map(|(i, _)| serde_json::json!({"id": i, "content": tokens[i], "special": true}))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab_map, "merges": merges},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let id = |k: &str| tokens[g.get_u64(k).unwrap() as usize];
    // The template as transformers ≥ 4.43 saves it, in its own file (the Qwen3 directory has it
    // in tokenizer_config.json).
    std::fs::write(
        dir.join("chat_template.jinja"),
        g.get_str("tokenizer.chat_template").unwrap(),
    )
    .unwrap();
    let mut tc = serde_json::json!({
        "bos_token": id("tokenizer.ggml.bos_token_id"),
        "eos_token": id("tokenizer.ggml.eos_token_id"),
    });
    if let Ok(b) = g.get_bool("tokenizer.ggml.add_bos_token") {
        tc["add_bos_token"] = serde_json::json!(b);
    }
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    originals
}

#[test]
fn default_model_written_as_hugging_face_imports_back_the_same() {
    let orig_path = default_model();
    let orig = GgufFile::open(&orig_path).unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("SmolLM2-135M-Instruct");
    let originals = write_hf_dir(&orig, &dir);
    let got = import(&dir);

    assert_eq!(got.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    for k in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ] {
        assert_eq!(got.get(k), orig.get(k), "metadata `{k}`");
    }
    assert_eq!(got.tensors.len(), originals.len());
    for (name, want) in &originals {
        let t = got.tensor(name).unwrap();
        assert_eq!(t.ggml_type, GgmlType::F32, "{name}");
        assert!(
            f32s(&got.tensor_bytes(t).unwrap()) == *want,
            "{name} differs"
        );
    }
    assert!(matches!(
        got.get("llama.rope.freq_base"),
        Some(Value::F32(_))
    ));

    // The same greedy tokens from the imported directory as from the original dequantized to
    // an f32 GGUF by `ferrolm quantize` (the Q4_1 file itself runs other kernels, whose
    // rounding picks another first token on this prompt).
    let f32_path = t.path().join("smollm2-f32.gguf");
    let out = ferrolm()
        .arg("quantize")
        .arg(&orig_path)
        .arg(&f32_path)
        .args(["--type", "f32", "--no-receipt"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gen = |m: &Path| {
        json_of(
            &ferrolm()
                .args(["generate", "--model"])
                .arg(m)
                .args(["--json", "--temperature", "0", "--max-tokens", "12"])
                .args(["--prompt", "What is the capital of France?"])
                .output()
                .unwrap(),
        )
    };
    let (a, b) = (gen(&f32_path), gen(&dir));
    assert_eq!(ids(&a["prompt_ids"]), ids(&b["prompt_ids"]));
    assert_eq!(ids(&a["ids"]), ids(&b["ids"]), "{a}\n{b}");
}
