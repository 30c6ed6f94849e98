//! The Llama architecture for training: RMSNorm, RoPE (interleaved pairs, as GGUF `llama`
//! stores it), grouped-query causal attention, SwiGLU, tied or untied output head — the same
//! math as `ferrolm_models::llama`, which serves the exported model (a test holds the two to
//! the same logits).
//!
//! Reads top-down: config → parameter layout (one flat buffer; names are Hugging Face Llama's,
//! so the safetensors checkpoint is a key-for-key map) → initialisation → activations →
//! forward → backward. Parameters and gradients are flat `Vec<f32>`s with the same layout, so
//! the optimizer, clipping and zeroing are single loops. Activations are sized once for
//! (batch, context) and reused every step: a step allocates nothing.

use serde::{Deserialize, Serialize};

use crate::lora::{Group, Lora, LoraActs};
use crate::ops::{self, AttnShape};

// ---- config ---------------------------------------------------------------------------------

/// The blueprint of a model (validated; see `config.rs` for the file form and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn_dim: usize,
    pub context: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim()
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Every rule the math needs, each error naming the field and how to fix it.
    pub fn validate(&self) -> Result<(), String> {
        let c = self;
        let positive = [
            ("vocab_size", c.vocab_size),
            ("dim", c.dim),
            ("n_layers", c.n_layers),
            ("n_heads", c.n_heads),
            ("n_kv_heads", c.n_kv_heads),
            ("ffn_dim", c.ffn_dim),
            ("context", c.context),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if !c.dim.is_multiple_of(c.n_heads) {
            return Err(format!(
                "dim {} is not divisible by n_heads {}: pick a width that is a multiple of the head count",
                c.dim, c.n_heads
            ));
        }
        if !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                c.n_heads, c.n_kv_heads
            ));
        }
        if !c.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head size dim/n_heads = {} must be even for RoPE",
                c.head_dim()
            ));
        }
        if c.rope_theta.partial_cmp(&1.0) != Some(std::cmp::Ordering::Greater)
            || c.rms_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err("rope_theta must be > 1 and rms_eps > 0".into());
        }
        Ok(())
    }

    /// Parameter count (the tied embedding counted once).
    pub fn n_params(&self) -> usize {
        Layout::new(self).len
    }
}

// ---- parameter layout -------------------------------------------------------------------------

/// One named tensor in the flat buffer.
#[derive(Debug, Clone)]
pub struct TensorSlot {
    /// Hugging Face Llama name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major, `[out, in]` for matrices.
    pub shape: Vec<usize>,
    pub offset: usize,
    /// AdamW weight decay applies (matrices and the embedding, not norm weights).
    pub decay: bool,
}

impl TensorSlot {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one block's tensors. q, k, v are adjacent (one (q+2kv, dim) matrix for one
/// product) and so are gate and up.
#[derive(Debug, Clone, Copy)]
struct BlockOffsets {
    attn_norm: usize,
    wqkv: usize,
    wo: usize,
    ffn_norm: usize,
    w_gate_up: usize,
    w_down: usize,
}

/// Where every tensor lives in the flat parameter (and gradient) buffer.
#[derive(Debug, Clone)]
pub struct Layout {
    pub tensors: Vec<TensorSlot>,
    pub len: usize,
    embed: usize,
    blocks: Vec<BlockOffsets>,
    norm: usize,
    /// The output head: the embedding itself when tied.
    head: usize,
}

impl Layout {
    pub fn new(c: &ModelConfig) -> Self {
        let mut tensors = Vec::new();
        let mut len = 0;
        let mut add = |name: String, shape: Vec<usize>, decay: bool| {
            let offset = len;
            len += shape.iter().product::<usize>();
            tensors.push(TensorSlot {
                name,
                shape,
                offset,
                decay,
            });
            offset
        };
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let embed = add(
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, d],
            true,
        );
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let attn_norm = add(p("input_layernorm.weight"), vec![d], false);
            let wqkv = add(p("self_attn.q_proj.weight"), vec![q, d], true);
            add(p("self_attn.k_proj.weight"), vec![kv, d], true);
            add(p("self_attn.v_proj.weight"), vec![kv, d], true);
            let wo = add(p("self_attn.o_proj.weight"), vec![d, q], true);
            let ffn_norm = add(p("post_attention_layernorm.weight"), vec![d], false);
            let w_gate_up = add(p("mlp.gate_proj.weight"), vec![f, d], true);
            add(p("mlp.up_proj.weight"), vec![f, d], true);
            let w_down = add(p("mlp.down_proj.weight"), vec![d, f], true);
            blocks.push(BlockOffsets {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
            });
        }
        let norm = add("model.norm.weight".into(), vec![d], false);
        let head = if c.tied_embeddings {
            embed
        } else {
            add("lm_head.weight".into(), vec![c.vocab_size, d], true)
        };
        Layout {
            tensors,
            len,
            embed,
            blocks,
            norm,
            head,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSlot> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

// ---- initialisation ---------------------------------------------------------------------------

/// splitmix64: the seeded source for initialisation (reproducible across platforms).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// GPT-2 / nanoGPT initialisation: every matrix N(0, 0.02), the projections that write into
/// the residual stream (o_proj, down_proj) N(0, 0.02/√(2·layers)) so the stream's variance
/// does not grow with depth; norm weights 1.
pub fn init_params(c: &ModelConfig, layout: &Layout, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    let mut p = vec![0f32; layout.len];
    let resid_std = 0.02 / (2.0 * c.n_layers as f32).sqrt();
    for t in &layout.tensors {
        let std = if t.name.ends_with("o_proj.weight") || t.name.ends_with("down_proj.weight") {
            resid_std
        } else {
            0.02
        };
        let dst = &mut p[t.range()];
        if t.shape.len() == 1 {
            dst.fill(1.0);
        } else {
            dst.iter_mut().for_each(|x| *x = std * rng.normal());
        }
    }
    p
}

// ---- activations ------------------------------------------------------------------------------

/// What one block saves in forward for backward, (rows = batch × context). The norms'
/// outputs and the SwiGLU activation are not kept: backward recomputes them from `rstd`s'
/// inputs and `gu` (cheap elementwise work, a third of a block's floats).
#[derive(Debug, Default)]
struct BlockActs {
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    rstd2: Vec<f32>,
    gu: Vec<f32>,
}

/// Activations and backward scratch for one (batch, context) shape.
#[derive(Debug, Default)]
pub struct Activations {
    batch: usize,
    ctx: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Residual stream at each block's input, plus the final one: (layers + 1) × rows × dim.
    xs: Vec<Vec<f32>>,
    blocks: Vec<BlockActs>,
    rstd_f: Vec<f32>,
    hf: Vec<f32>,
    /// A norm's output (rows × dim) and the SwiGLU activation (rows × ffn) of the block at
    /// hand, in forward and again (recomputed) in backward; `rstd_tmp` takes the recomputed
    /// norms' reciprocal RMS.
    hn: Vec<f32>,
    act: Vec<f32>,
    rstd_tmp: Vec<f32>,
    /// Attention probabilities (batch, heads, ctx, ctx) of one layer at a time: the forward
    /// writes each layer's and backward recomputes them (keeping every layer's would be the
    /// largest buffer of a long-context step).
    probs: Vec<f32>,
    /// (rows, vocab): logits after forward; their gradient after backward starts.
    pub logits: Vec<f32>,
    // backward scratch
    dx: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    dgu: Vec<f32>,
    dact: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Activations {
    pub fn new(c: &ModelConfig, batch: usize, ctx: usize) -> Self {
        let n = batch * ctx;
        let z = |len: usize| vec![0f32; len];
        let (d, f) = (c.dim, c.ffn_dim);
        let (cos, sin) = ops::rope_table(ctx, c.head_dim(), c.rope_theta);
        Activations {
            batch,
            ctx,
            inputs: vec![0; n],
            targets: vec![0; n],
            xs: (0..=c.n_layers).map(|_| z(n * d)).collect(),
            blocks: (0..c.n_layers)
                .map(|_| BlockActs {
                    rstd1: z(n),
                    qkv: z(n * c.qkv_dim()),
                    att: z(n * c.q_dim()),
                    x_mid: z(n * d),
                    rstd2: z(n),
                    gu: z(n * 2 * f),
                })
                .collect(),
            rstd_f: z(n),
            hf: z(n * d),
            probs: z(batch * c.n_heads * ctx * ctx),
            hn: z(n * d),
            act: z(n * f),
            rstd_tmp: z(n),
            // allocated by the first `forward_with`: objectives that score through
            // `scored_logprobs` never hold rows × vocab floats
            logits: Vec::new(),
            dx: z(n * d),
            dh: z(n * d),
            dqkv: z(n * c.qkv_dim()),
            datt: z(n * c.q_dim()),
            dgu: z(n * 2 * f),
            dact: z(n * f),
            cos,
            sin,
        }
    }

    /// Split `tokens` (batch rows of ctx + 1) into inputs (first ctx) and targets (last ctx).
    pub fn set_sequences(&mut self, tokens: &[u32]) {
        let t = self.ctx;
        assert_eq!(
            tokens.len(),
            self.batch * (t + 1),
            "tokens must be batch × (ctx + 1)"
        );
        for (row, seq) in tokens.chunks_exact(t + 1).enumerate() {
            self.inputs[row * t..][..t].copy_from_slice(&seq[..t]);
            self.targets[row * t..][..t].copy_from_slice(&seq[1..]);
        }
    }

    /// Set inputs and targets (batch × ctx each; a target may be [`IGNORE`]).
    pub fn set_scored(&mut self, inputs: &[u32], targets: &[u32]) {
        self.set_inputs(inputs);
        assert_eq!(
            targets.len(),
            self.targets.len(),
            "targets must be batch × ctx"
        );
        self.targets.copy_from_slice(targets);
    }

    /// Set the input tokens (batch × ctx) for [`forward_logits`].
    pub fn set_inputs(&mut self, ids: &[u32]) {
        assert_eq!(
            ids.len(),
            self.batch * self.ctx,
            "inputs must be batch × ctx"
        );
        self.inputs.copy_from_slice(ids);
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.batch, self.ctx)
    }

    /// The final hidden states after the output norm (rows × dim), as the last forward left
    /// them.
    pub fn hidden(&self) -> &[f32] {
        &self.hf
    }

    /// The loss's gradient w.r.t. [`Activations::hidden`], for [`backward_hidden_with`] to
    /// start from.
    pub fn hidden_grad_mut(&mut self) -> &mut [f32] {
        &mut self.dh
    }
}

// ---- forward ----------------------------------------------------------------------------------

/// Target id of a position that is not scored (prompt tokens in fine-tuning, padding).
pub const IGNORE: u32 = u32::MAX;

/// The base model's weights: f32 in the flat layout, or (QLoRA) each tensor kept in its
/// stored quantized form and dequantized when a product needs it.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Stored(&'a StoredBase),
}

/// Tensors of the layout in their stored form (see [`Weights::Stored`]), by offset.
#[derive(Debug)]
pub struct StoredBase {
    pub tensors: Vec<(usize, ferrolm_models::linear::Stored)>,
}

impl StoredBase {
    /// Bytes of weights held.
    pub fn storage_bytes(&self) -> usize {
        self.tensors.iter().map(|(_, t)| t.storage_bytes()).sum()
    }
}

impl<'a> Weights<'a> {
    /// The `len` values at `off` (a whole tensor when stored).
    fn get(&self, off: usize, len: usize) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Weights::F32(p) => std::borrow::Cow::Borrowed(&p[off..][..len]),
            Weights::Stored(s) => {
                // The span may cover adjacent tensors (q‖k‖v, gate‖up): dequantize each.
                // Every stored tensor was dequantized once when the base was loaded, so this
                // cannot fail but for memory; a silently zero weight would be worse: panic.
                let mut out = Vec::with_capacity(len);
                for (o, t) in s
                    .tensors
                    .iter()
                    .filter(|(o, _)| (off..off + len).contains(o))
                {
                    assert_eq!(
                        *o,
                        off + out.len(),
                        "stored base tensors must tile the span"
                    );
                    match t.dequantize() {
                        Ok(v) => out.extend_from_slice(&v),
                        Err(e) => panic!("stored base tensor at offset {o}: {e}"),
                    }
                }
                assert_eq!(out.len(), len, "stored base span at {off} is incomplete");
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Adapters in a forward pass: their layout, weights and saved activations.
pub struct LoraRun<'a> {
    pub lora: &'a Lora,
    pub params: &'a [f32],
    pub acts: &'a mut LoraActs,
}

/// Forward over `tokens` (batch rows of ctx + 1 tokens: inputs are the first ctx, targets the
/// last ctx). Returns the mean next-token cross-entropy. With `grad_scale = Some(s)`,
/// `a.logits` is left holding the gradient of `s · loss` (ready for [`backward`]); without,
/// it holds the logits.
pub fn forward(
    c: &ModelConfig,
    layout: &Layout,
    params: &[f32],
    tokens: &[u32],
    a: &mut Activations,
    grad_scale: Option<f32>,
) -> f32 {
    a.set_sequences(tokens);
    forward_scored(c, layout, Weights::F32(params), None, a, grad_scale)
}

/// Forward over the inputs and targets already in `a` (targets may be [`IGNORE`]), with
/// optional adapters; the loss is the mean over scored positions.
pub fn forward_scored(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    lora: Option<LoraRun>,
    a: &mut Activations,
    grad_scale: Option<f32>,
) -> f32 {
    forward_with(c, layout, params, lora, a);
    let targets = std::mem::take(&mut a.targets);
    let loss = ops::cross_entropy(&mut a.logits, &targets, c.vocab_size, grad_scale);
    a.targets = targets;
    loss
}

/// Logits for `a.inputs` (batch × ctx tokens, positions 0..ctx in each row) into `a.logits`.
pub fn forward_logits(c: &ModelConfig, layout: &Layout, params: &[f32], a: &mut Activations) {
    forward_with(c, layout, Weights::F32(params), None, a);
}

/// Logits for the inputs in `a` into `a.logits`, with optional adapters; no loss (the
/// sequence-level objectives score the rows themselves).
pub fn forward_with(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    lora: Option<LoraRun>,
    a: &mut Activations,
) {
    forward_hidden_with(c, layout, params, lora, a);
    let head = params.get(layout.head, c.vocab_size * c.dim);
    let n = a.batch * a.ctx;
    a.logits.resize(n * c.vocab_size, 0.0);
    ops::matmul_nt(&mut a.logits, &a.hf, &head, n, c.vocab_size, c.dim, false);
}

/// Rows of the output head computed at once by [`scored_logprobs`] and
/// [`scored_head_backward`]: 64 × a 49,152-token vocabulary is 12.6 MB of logits, where all of
/// a step's rows (8 sequences × 512 positions) would be 805 MB.
const HEAD_ROWS: usize = 64;

/// The rows of `targets` that are scored (not [`IGNORE`]).
fn scored_rows(targets: &[u32]) -> Vec<usize> {
    (0..targets.len())
        .filter(|&i| targets[i] != IGNORE)
        .collect()
}

/// After [`forward_hidden_with`]: each scored position's target log-prob and log-sum-exp
/// (zero at unscored ones), with the output head run on the scored rows only, a few at a time.
pub fn scored_logprobs(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    a: &Activations,
    targets: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let (d, v) = (c.dim, c.vocab_size);
    let head = params.get(layout.head, v * d);
    let (mut logp, mut lse) = (vec![0f32; targets.len()], vec![0f32; targets.len()]);
    let mut x = vec![0f32; HEAD_ROWS * d];
    let mut logits = vec![0f32; HEAD_ROWS * v];
    for rows in scored_rows(targets).chunks(HEAD_ROWS) {
        let m = rows.len();
        for (k, &i) in rows.iter().enumerate() {
            x[k * d..][..d].copy_from_slice(&a.hf[i * d..][..d]);
        }
        ops::matmul_nt(&mut logits[..m * v], &x[..m * d], &head, m, v, d, false);
        let t: Vec<u32> = rows.iter().map(|&i| targets[i]).collect();
        let (lp, l) = ops::target_logprobs(&logits[..m * v], &t, v);
        for (k, &i) in rows.iter().enumerate() {
            logp[i] = lp[k];
            lse[i] = l[k];
        }
    }
    (logp, lse)
}

/// The gradient of `−Σ w_i · log p(target_i)` through the output head, on the scored rows a
/// few at a time (the logits recomputed): into [`Activations::hidden_grad_mut`] for
/// [`backward_hidden_with`], and into the head's weights when `grads` is given (the head
/// trains). `lse` is from [`scored_logprobs`].
#[allow(clippy::too_many_arguments)]
pub fn scored_head_backward(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    mut grads: Option<&mut [f32]>,
    a: &mut Activations,
    targets: &[u32],
    lse: &[f32],
    w: &[f32],
) {
    let (d, v) = (c.dim, c.vocab_size);
    let head = params.get(layout.head, v * d);
    a.dh.fill(0.0);
    let mut x = vec![0f32; HEAD_ROWS * d];
    let mut dx = vec![0f32; HEAD_ROWS * d];
    let mut logits = vec![0f32; HEAD_ROWS * v];
    let rows: Vec<usize> = scored_rows(targets)
        .into_iter()
        .filter(|&i| w[i] != 0.0)
        .collect();
    for rows in rows.chunks(HEAD_ROWS) {
        let m = rows.len();
        for (k, &i) in rows.iter().enumerate() {
            x[k * d..][..d].copy_from_slice(&a.hf[i * d..][..d]);
        }
        ops::matmul_nt(&mut logits[..m * v], &x[..m * d], &head, m, v, d, false);
        let t: Vec<u32> = rows.iter().map(|&i| targets[i]).collect();
        let l: Vec<f32> = rows.iter().map(|&i| lse[i]).collect();
        let wk: Vec<f32> = rows.iter().map(|&i| w[i]).collect();
        ops::weighted_ce_grad(&mut logits[..m * v], &t, v, &l, &wk);
        ops::matmul_nn(&mut dx[..m * d], &logits[..m * v], &head, m, d, v, false);
        for (k, &i) in rows.iter().enumerate() {
            a.dh[i * d..][..d].copy_from_slice(&dx[k * d..][..d]);
        }
        if let Some(g) = grads.as_deref_mut() {
            ops::matmul_tn_acc(
                &mut g[layout.head..][..v * d],
                &logits[..m * v],
                &x[..m * d],
                v,
                d,
                m,
            );
        }
    }
}

/// The model up to the final hidden states ([`Activations::hidden`]) without the output head:
/// what a scalar head (a reward model) reads.
pub fn forward_hidden_with(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    mut lora: Option<LoraRun>,
    a: &mut Activations,
) {
    let (b, t) = (a.batch, a.ctx);
    let n = b * t;
    let (d, f, qd, qkvd) = (c.dim, c.ffn_dim, c.q_dim(), c.qkv_dim());
    let shape = AttnShape {
        t,
        n_heads: c.n_heads,
        n_kv: c.n_kv_heads,
        hd: c.head_dim(),
    };
    let embed = params.get(layout.embed, c.vocab_size * d);
    for (x, &tok) in a.xs[0].chunks_exact_mut(d).zip(&a.inputs) {
        x.copy_from_slice(&embed[tok as usize * d..][..d]);
    }
    for (l, o) in layout.blocks.iter().enumerate() {
        let (xs_in, xs_out) = a.xs.split_at_mut(l + 1);
        let (x, x_next) = (&xs_in[l], &mut xs_out[0]);
        let s = &mut a.blocks[l];
        let w = |off: usize, len: usize| params.get(off, len);
        let mut adapt = |g: Group, x: &[f32], out: &mut [f32], stride: usize| {
            if let Some(r) = lora.as_mut() {
                r.lora.forward(r.params, r.acts, l, g, x, out, stride, n);
            }
        };
        // attention
        ops::rms_norm(x, &w(o.attn_norm, d), c.rms_eps, &mut a.hn, &mut s.rstd1);
        ops::matmul_nt(&mut s.qkv, &a.hn, &w(o.wqkv, qkvd * d), n, qkvd, d, false);
        adapt(Group::Qkv, &a.hn, &mut s.qkv, qkvd);
        let rot = qd + c.kv_dim();
        ops::rope(&mut s.qkv, qkvd, rot, c.head_dim(), t, &a.cos, &a.sin, 1.0);
        ops::attention(shape, &s.qkv, &mut a.probs, &mut s.att);
        s.x_mid.copy_from_slice(x);
        ops::matmul_nt(&mut s.x_mid, &s.att, &w(o.wo, d * qd), n, d, qd, true);
        adapt(Group::O, &s.att, &mut s.x_mid, d);
        // feed-forward
        ops::rms_norm(
            &s.x_mid,
            &w(o.ffn_norm, d),
            c.rms_eps,
            &mut a.hn,
            &mut s.rstd2,
        );
        ops::matmul_nt(
            &mut s.gu,
            &a.hn,
            &w(o.w_gate_up, 2 * f * d),
            n,
            2 * f,
            d,
            false,
        );
        adapt(Group::GateUp, &a.hn, &mut s.gu, 2 * f);
        ops::swiglu(&s.gu, f, &mut a.act);
        x_next.copy_from_slice(&s.x_mid);
        ops::matmul_nt(x_next, &a.act, &w(o.w_down, d * f), n, d, f, true);
        adapt(Group::Down, &a.act, x_next, d);
    }
    let x = &a.xs[c.n_layers];
    ops::rms_norm(
        x,
        &params.get(layout.norm, d),
        c.rms_eps,
        &mut a.hf,
        &mut a.rstd_f,
    );
}

// ---- backward ---------------------------------------------------------------------------------

/// Adapters in a backward pass.
pub struct LoraGrad<'a> {
    pub lora: &'a Lora,
    pub params: &'a [f32],
    pub grads: &'a mut [f32],
    pub acts: &'a mut LoraActs,
}

/// Accumulate into `grads` the gradient of the loss whose gradient w.r.t. the logits
/// [`forward`] left in `a.logits` (call it with `grad_scale`).
pub fn backward(
    c: &ModelConfig,
    layout: &Layout,
    params: &[f32],
    grads: &mut [f32],
    a: &mut Activations,
) {
    backward_with(c, layout, Weights::F32(params), Some(grads), None, a);
}

/// Backward with optional adapters; `grads: None` freezes the base model (its weight
/// gradients are not computed at all — LoRA's saving in time as well as memory).
pub fn backward_with(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    mut grads: Option<&mut [f32]>,
    lora: Option<LoraGrad>,
    a: &mut Activations,
) {
    let n = a.batch * a.ctx;
    let (d, v) = (c.dim, c.vocab_size);
    // output head: dW_head += dlogitsᵀ · hf, dhf = dlogits · W_head
    if let Some(g) = grads.as_deref_mut() {
        ops::matmul_tn_acc(&mut g[layout.head..][..v * d], &a.logits, &a.hf, v, d, n);
    }
    let head = params.get(layout.head, v * d);
    ops::matmul_nn(&mut a.dh, &a.logits, &head, n, d, v, false);
    backward_hidden_with(c, layout, params, grads, lora, a);
}

/// Backward from the gradient w.r.t. the final hidden states that the caller left in
/// [`Activations::hidden_grad_mut`] (a scalar head's), through the final norm and the blocks.
pub fn backward_hidden_with(
    c: &ModelConfig,
    layout: &Layout,
    params: Weights,
    mut grads: Option<&mut [f32]>,
    mut lora: Option<LoraGrad>,
    a: &mut Activations,
) {
    let (b, t) = (a.batch, a.ctx);
    let n = b * t;
    let (d, f, v, qd, qkvd) = (c.dim, c.ffn_dim, c.vocab_size, c.q_dim(), c.qkv_dim());
    let shape = AttnShape {
        t,
        n_heads: c.n_heads,
        n_kv: c.n_kv_heads,
        hd: c.head_dim(),
    };
    let w = |off: usize, len: usize| params.get(off, len);
    // `dW += dYᵀ · X` for a base matrix, when the base trains.
    let weight_grad =
        |grads: &mut Option<&mut [f32]>, off: usize, dy: &[f32], x: &[f32], m: usize, k: usize| {
            if let Some(g) = grads.as_deref_mut() {
                ops::matmul_tn_acc(&mut g[off..][..m * k], dy, x, m, k, n);
            }
        };
    let mut scratch_dw = vec![0f32; if grads.is_some() { 0 } else { d }];
    // final norm
    a.dx.fill(0.0);
    {
        let gw: &mut [f32] = match grads.as_deref_mut() {
            Some(g) => &mut g[layout.norm..][..d],
            None => &mut scratch_dw,
        };
        let xf = &a.xs[c.n_layers];
        ops::rms_norm_backward(xf, &w(layout.norm, d), &a.rstd_f, &a.dh, &mut a.dx, gw);
    }
    for (l, o) in layout.blocks.iter().enumerate().rev() {
        let s = &a.blocks[l];
        let mut adapt = |g: Group, x: &[f32], dy: &[f32], stride: usize, dx: &mut [f32]| {
            if let Some(r) = lora.as_mut() {
                r.lora
                    .backward(r.params, r.grads, r.acts, l, g, x, dy, stride, dx, n);
            }
        };
        // feed-forward: x_next = x_mid + down(swiglu(gate_up(norm(x_mid)))); its norm and
        // activation recomputed (bit for bit what forward computed)
        ops::swiglu(&s.gu, f, &mut a.act);
        ops::rms_norm(
            &s.x_mid,
            &w(o.ffn_norm, d),
            c.rms_eps,
            &mut a.hn,
            &mut a.rstd_tmp,
        );
        ops::matmul_nn(&mut a.dact, &a.dx, &w(o.w_down, d * f), n, f, d, false);
        adapt(Group::Down, &a.act, &a.dx, d, &mut a.dact);
        weight_grad(&mut grads, o.w_down, &a.dx, &a.act, d, f);
        ops::swiglu_backward(&s.gu, &a.dact, f, &mut a.dgu);
        ops::matmul_nn(
            &mut a.dh,
            &a.dgu,
            &w(o.w_gate_up, 2 * f * d),
            n,
            d,
            2 * f,
            false,
        );
        adapt(Group::GateUp, &a.hn, &a.dgu, 2 * f, &mut a.dh);
        weight_grad(&mut grads, o.w_gate_up, &a.dgu, &a.hn, 2 * f, d);
        {
            let gw: &mut [f32] = match grads.as_deref_mut() {
                Some(g) => &mut g[o.ffn_norm..][..d],
                None => &mut scratch_dw,
            };
            ops::rms_norm_backward(&s.x_mid, &w(o.ffn_norm, d), &s.rstd2, &a.dh, &mut a.dx, gw);
        }
        // attention: x_mid = x + o(attn(rope(qkv(norm(x)))))
        ops::matmul_nn(&mut a.datt, &a.dx, &w(o.wo, d * qd), n, qd, d, false);
        adapt(Group::O, &s.att, &a.dx, d, &mut a.datt);
        weight_grad(&mut grads, o.wo, &a.dx, &s.att, d, qd);
        ops::attention_probs(shape, &s.qkv, &mut a.probs);
        ops::attention_backward(shape, &s.qkv, &a.probs, &a.datt, &mut a.dqkv);
        let rot = qd + c.kv_dim();
        ops::rope(
            &mut a.dqkv,
            qkvd,
            rot,
            c.head_dim(),
            t,
            &a.cos,
            &a.sin,
            -1.0,
        );
        ops::matmul_nn(&mut a.dh, &a.dqkv, &w(o.wqkv, qkvd * d), n, d, qkvd, false);
        ops::rms_norm(
            &a.xs[l],
            &w(o.attn_norm, d),
            c.rms_eps,
            &mut a.hn,
            &mut a.rstd_tmp,
        );
        adapt(Group::Qkv, &a.hn, &a.dqkv, qkvd, &mut a.dh);
        weight_grad(&mut grads, o.wqkv, &a.dqkv, &a.hn, qkvd, d);
        {
            let gw: &mut [f32] = match grads.as_deref_mut() {
                Some(g) => &mut g[o.attn_norm..][..d],
                None => &mut scratch_dw,
            };
            ops::rms_norm_backward(&a.xs[l], &w(o.attn_norm, d), &s.rstd1, &a.dh, &mut a.dx, gw);
        }
    }
    // embedding rows
    if let Some(g) = grads {
        let ge = &mut g[layout.embed..][..v * d];
        for (dx, &tok) in a.dx.chunks_exact(d).zip(&a.inputs) {
            for (g, x) in ge[tok as usize * d..][..d].iter_mut().zip(dx) {
                *g += x;
            }
        }
    }
}
