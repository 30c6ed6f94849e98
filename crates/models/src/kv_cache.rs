//! The KV cache: K and V of every layer, in blocks of `block_size` token slots addressed by
//! slot (`block_id * block_size + offset`), stored as one [`KvType`].
//!
//! Contract: the forward passes write a token's K and V with [`KvCache::write`] (which rotates
//! and quantizes as the type asks) and read them through [`KvCache::layer`]: dequantized rows
//! ([`KvLayer::k_f32`]) or the attention kernel in `simd.rs`, which loads each type's rows
//! natively. Which blocks a sequence owns is `ferrolm-kv`'s business.
//!
//! Layout per layer: `[num_blocks, block_size, n_kv_heads, row]`, where one head's row is
//! `head_dim` f16 values, or for the block types `head_dim / 32` f16 scales followed by the
//! quants (32 per block: int8 for q8_0; for q4_0 16 bytes per block, byte `i` holding element
//! `i` in its low nibble and element `i + 16` in its high one, value `Q4_LEVELS[q] · scale`: the
//! layout of ggml's q4_0 blocks with the non-uniform levels of its iq4_nl ones, so a block is
//! bit for bit ggml's IQ4_NL). Every row is a whole number of `u16`s (q8_0: 17 per 32 values, q4_0: 9), so
//! all types share one `u16` store and a fresh cache is zeroed pages the OS maps on first write.
//!
//! The block types rotate before quantizing (QuaRot; q4_0 always, q8_0 when the head size is a
//! power of two, see [`KvType::rotates`]): each head of K and V is multiplied by the
//! normalized Walsh–Hadamard matrix `H` (orthonormal and symmetric, `H·H = I`), which spreads
//! an outlier channel over the whole head so the block's scale no longer fits it alone. The
//! attention rotates q the same way, so `(Hq)·(Hk) = q·k`, and un-rotates its output, since
//! `Σ w_j (H v_j) = H (Σ w_j v_j)`. `FERROLM_KV_HADAMARD=0` turns the rotation off (only to
//! measure what it buys; see BENCHMARKS.md).
//!
//! q4_0 also calibrates keys before rotating them ([`KvType::calibrates_keys`], [`KeyCalibration`]):
//! it stores `(k − m) / s` per (layer, KV head, channel) and the attention multiplies its
//! queries by `s` ([`KvCache::query_to_stored`]). Softmax attention sees q·k only up to a
//! constant per query: `(q·s)·((k − m)/s) = q·k − q·m`, and `q·m` is the same for every key a
//! query sees (whole context or sliding window), so this is exact in real arithmetic and
//! changes only what gets rounded. `m` is the model's mean post-RoPE key: the large, nearly
//! constant part of its outlier channels (RoPE's low-frequency pairs barely turn over a
//! context), which set the block scales while telling attention nothing. `s = sqrt(σ_k /
//! rms_q)` weighs each channel by what its error costs: quantizing adds error in proportion to
//! the keys' spread and it reaches the score in proportion to the queries' size, and this `s`
//! minimizes the product of the two. Both come from one forward pass over a calibration text
//! at the first q4_0 cache of a model ([`key_calibration`], [`Model::set_calibration`]; the CLI
//! sets its built-in text at load). It would not be exact with soft-capped attention scores
//! (Gemma 2) or a per-key additive bias (ALiBi); no architecture here has either (Gemma 3
//! caps only the final logits). Prefix caching copies stored rows between sequences of one
//! model, which share `m` and `s`. On SmolLM2-135M over 8,192 tokens it takes q4_0's
//! perplexity loss against f16 KV from +2.81% to +1.35% (the shift alone: +1.84%) and the KL
//! divergence from 0.040 to 0.024, at the same 4.5 bits a value (BENCHMARKS.md, "KV cache
//! types"). `FERROLM_KV_KEY_SHIFT=0` and `FERROLM_KV_KEY_SCALE=0` turn each part off, only to
//! measure it.

use std::fmt;
use std::str::FromStr;

use crate::{Batch, Config, Model, ModelError, Scratch, SeqSpan};

/// Values per quantization block (each with one f16 scale).
pub const QK: usize = 32;

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum KvType {
    /// f16 values, as llama.cpp's cache is by default: half the memory and half the bytes
    /// attention reads at every decode step of f32, which at 16 streams is more than the
    /// weights. Measured against the f32 reference (golden tests, 2026-11-27): perplexity
    /// +0.06% with an f32 cache, +0.23% with f16; last-position KL 0.0047 either way (max |Δ|
    /// 0.62); greedy tokens unchanged.
    #[default]
    F16,
    /// Blocks of 32 int8 values and an f16 scale, over Hadamard-rotated heads where the head
    /// size is a power of two: 8.5 bits a value.
    Q8_0,
    /// Blocks of 32 4-bit values (on the non-uniform grid [`Q4_LEVELS`]) and an f16 scale, over
    /// Hadamard-rotated heads: 4.5 bits a value.
    Q4_0,
}

/// Every type, in the order `--help` lists them.
pub const KV_TYPES: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// `u16`s one head's row of `head_dim` values takes.
    pub fn row_units(self, head_dim: usize) -> usize {
        match self {
            KvType::F16 => head_dim,
            KvType::Q8_0 => head_dim / QK + head_dim / 2,
            KvType::Q4_0 => head_dim / QK + head_dim / 4,
        }
    }

    /// The type rotates heads of `head_dim` values with a Hadamard transform before quantizing:
    /// q4_0 always (it refuses other head sizes), q8_0 when `head_dim` is a power of two (as
    /// llama.cpp rotates every quantized cache type; for q8_0 it lowers the KL divergence from
    /// f16 KV by 10% on SmolLM2 over 8192 tokens, and a head size such as 96 is stored
    /// unrotated).
    pub fn rotates(self, head_dim: usize) -> bool {
        match self {
            KvType::F16 => false,
            KvType::Q8_0 => head_dim.is_power_of_two(),
            KvType::Q4_0 => true,
        }
    }

    /// The cache calibrates keys of this type with the model's [`KeyCalibration`] (see the
    /// module docs): q4_0, where it lowers the error that 4-bit keys add to attention.
    pub fn calibrates_keys(self) -> bool {
        matches!(self, KvType::Q4_0)
    }

    /// Why this type cannot store heads of `head_dim` values, if it cannot.
    fn refuses(self, head_dim: usize) -> Option<&'static str> {
        match self {
            KvType::F16 => None,
            _ if !head_dim.is_multiple_of(QK) || head_dim == 0 => {
                Some("it stores heads in blocks of 32 values, so it needs a multiple of 32")
            }
            KvType::Q4_0 if !head_dim.is_power_of_two() => {
                Some("its Hadamard rotation needs a power of two")
            }
            _ => None,
        }
    }

    /// The type can store this model's heads; if not, an error naming the head size and the
    /// types that can.
    pub fn check(self, cfg: &Config) -> Result<(), ModelError> {
        let hd = cfg.head_dim;
        match self.refuses(hd) {
            None => Ok(()),
            Some(need) => Err(ModelError::KvType {
                kv_type: self.name(),
                head_dim: hd,
                need,
                works: KV_TYPES
                    .iter()
                    .filter(|t| t.refuses(hd).is_none())
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Bytes of K and V one token takes over all layers of a model of blueprint `cfg`.
    pub fn bytes_per_token(self, cfg: &Config) -> usize {
        2 * cfg.n_layers * cfg.n_kv_heads * self.row_units(cfg.head_dim) * 2
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KV_TYPES
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown KV cache type `{s}`: give one of f16, q8_0, q4_0"))
    }
}

/// K and V for every layer (see the module docs for the layout).
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    kind: KvType,
    /// Heads are Hadamard-rotated before they are stored (q4_0, unless turned off).
    rotate: bool,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// `u16`s per head row.
    row: usize,
    k: Vec<u16>,
    v: Vec<u16>,
    /// One head, rotated before it is quantized.
    tmp: Vec<f32>,
    /// What the cache does to every key before it rotates and stores it, `(k − shift) / scale`,
    /// and to every query, `q · scale` (`n_layers · n_kv_heads · head_dim` values each, per
    /// (layer, KV head, channel)); `None`: nothing. See the module docs.
    keys: Option<KeyCalibration>,
}

/// Tokens from which [`KvCache::write_batch`] splits a quantized cache's writes across threads.
const WRITE_PAR_MIN: usize = 4;

/// A pointer into a cache's storage that [`KvCache::write_batch`]'s tasks share; each writes
/// its own tokens' rows.
struct Ptr16(*mut u16);
// SAFETY: only used for disjoint writes (see `write_batch`).
unsafe impl Send for Ptr16 {}
unsafe impl Sync for Ptr16 {}

/// A model's key statistics for the cache ([`key_calibration`]): per (layer, KV head, channel),
/// `n_layers · n_kv_heads · head_dim` values each.
#[derive(Debug, Clone)]
pub struct KeyCalibration {
    /// The mean post-RoPE key.
    pub shift: Vec<f32>,
    /// Divides keys and multiplies queries: `sqrt(σ_k / rms_q)`, the scale that minimizes the
    /// error quantizing keys adds to q·k when it is the same in every channel.
    pub scale: Vec<f32>,
}

impl KvCache {
    /// An f16 cache (every head size can take it). Zero-initialised storage; pages are only
    /// touched (and so only resident) once written.
    pub fn new(cfg: &Config, block_size: usize, num_blocks: usize) -> Self {
        Self::build(cfg, KvType::F16, block_size, num_blocks)
    }

    /// A cache of `kind`, or an error if the model's head size cannot take it.
    pub fn with_type(
        cfg: &Config,
        kind: KvType,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, ModelError> {
        kind.check(cfg)?;
        Ok(Self::build(cfg, kind, block_size, num_blocks))
    }

    fn build(cfg: &Config, kind: KvType, block_size: usize, num_blocks: usize) -> Self {
        let row = kind.row_units(cfg.head_dim);
        let n = cfg.n_layers * num_blocks * block_size * cfg.n_kv_heads * row;
        let rotate = kind.rotates(cfg.head_dim)
            && std::env::var_os("FERROLM_KV_HADAMARD").is_none_or(|v| v != "0");
        KvCache {
            block_size,
            num_blocks,
            kind,
            rotate,
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            row,
            k: vec![0; n],
            v: vec![0; n],
            tmp: vec![0.0; cfg.head_dim],
            keys: None,
        }
    }

    /// A cache of `kind` for `model`: [`Self::with_type`], with the model's key calibration
    /// ([`Model::key_calibration`]) applied where the type asks ([`KvType::calibrates_keys`]) and
    /// the model has one. Every engine and session cache is built here.
    pub fn for_model(
        model: &Model,
        kind: KvType,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, ModelError> {
        let mut kv = Self::with_type(model.cfg(), kind, block_size, num_blocks)?;
        if kind.calibrates_keys() {
            if let Some(k) = model.key_calibration()? {
                let mut k = k.clone();
                if std::env::var_os("FERROLM_KV_KEY_SHIFT").is_some_and(|v| v == "0") {
                    k.shift.fill(0.0);
                }
                if std::env::var_os("FERROLM_KV_KEY_SCALE").is_some_and(|v| v == "0") {
                    k.scale.fill(1.0);
                }
                kv.set_keys(k);
            }
        }
        Ok(kv)
    }

    /// Store keys as `(k − shift) / scale` from now on, and have the attention multiply queries
    /// by `scale`. Attention is unchanged: `(q·s)·((k − m)/s) = q·k − q·m`, and `q·m` is the
    /// same for every key a query sees, which softmax ignores. So set it before the first write,
    /// and only for a model whose attention is a plain softmax of q·k (no soft cap on scores).
    pub fn set_keys(&mut self, k: KeyCalibration) {
        let n = self.n_layers * self.n_kv_heads * self.head_dim;
        assert!(
            k.shift.len() == n && k.scale.len() == n,
            "one key shift and scale per (layer, KV head, channel)"
        );
        self.keys = Some(k);
    }

    pub fn kind(&self) -> KvType {
        self.kind
    }

    /// Stored heads are Hadamard-rotated: the attention rotates q and un-rotates its output.
    pub fn rotated(&self) -> bool {
        self.rotate
    }

    /// The attention must pass its queries through [`Self::query_to_stored`].
    pub(crate) fn transforms_queries(&self) -> bool {
        self.rotate || self.keys.is_some()
    }

    /// Query head `q` (of KV head `kvh` in `layer`) into the basis the keys are stored in:
    /// times the key scale, then rotated, so its dot product with a stored key is q·k less a
    /// constant.
    pub(crate) fn query_to_stored(&self, layer: usize, kvh: usize, q: &mut [f32]) {
        if let Some(k) = &self.keys {
            let i = (layer * self.n_kv_heads + kvh) * self.head_dim;
            let s = &k.scale[i..i + self.head_dim];
            q.iter_mut().zip(s).for_each(|(x, &s)| *x *= s);
        }
        if self.rotate {
            rotate(q);
        }
    }

    pub fn num_slots(&self) -> usize {
        self.block_size * self.num_blocks
    }

    /// Bytes of the whole store.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 2
    }

    /// Bytes of K and V per token slot, over all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.row * 2
    }

    #[inline]
    fn layer_len(&self) -> usize {
        self.num_blocks * self.block_size * self.n_kv_heads * self.row
    }

    /// Store one token's K and V (`n_kv_heads · head_dim` values each) at `slot` of `layer`.
    pub(crate) fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (base, per) = (self.row_base(layer, slot), self.n_kv_heads * self.row);
        let mut tmp = std::mem::take(&mut self.tmp);
        let mut dk = std::mem::take(&mut self.k);
        let mut dv = std::mem::take(&mut self.v);
        self.store(
            layer,
            k,
            v,
            &mut dk[base..base + per],
            &mut dv[base..base + per],
            &mut tmp,
        );
        (self.tmp, self.k, self.v) = (tmp, dk, dv);
    }

    /// Store the K and V of a batch's tokens, token `i`'s (`rows(i)`, `n_kv_heads · head_dim`
    /// values each) at `slots[i]` of `layer`, as [`Self::write`] stores each. A quantized
    /// cache splits the tokens across the rayon pool: its scale search is most of the cost
    /// (q4_0 writes, vectorized, were still ~12% of a 512-token prompt's samples on one thread
    /// while the other waited).
    pub(crate) fn write_batch<'a>(
        &mut self,
        layer: usize,
        slots: &[usize],
        rows: impl Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
    ) {
        use rayon::prelude::*;
        let distinct = || {
            let mut s = slots.to_vec();
            s.sort_unstable();
            s.windows(2).all(|w| w[0] != w[1])
        };
        if self.kind == KvType::F16 || slots.len() < WRITE_PAR_MIN || !distinct() {
            for (i, &slot) in slots.iter().enumerate() {
                let (k, v) = rows(i);
                self.write(layer, slot, k, v);
            }
            return;
        }
        let per = self.n_kv_heads * self.row;
        let len = self.k.len();
        assert!(slots.iter().all(|&s| self.row_base(layer, s) + per <= len));
        let (kp, vp) = (Ptr16(self.k.as_mut_ptr()), Ptr16(self.v.as_mut_ptr()));
        let this = &*self;
        let chunk = slots
            .len()
            .div_ceil(4 * rayon::current_num_threads().max(1));
        slots
            .par_chunks(chunk)
            .enumerate()
            .for_each_init(Vec::new, |tmp, (c, ch)| {
                let (kp, vp) = (&kp, &vp);
                tmp.resize(this.head_dim, 0.0);
                for (j, &slot) in ch.iter().enumerate() {
                    let (k, v) = rows(c * chunk + j);
                    let base = this.row_base(layer, slot);
                    // SAFETY: in bounds (asserted above), and the slots are distinct (checked),
                    // so no two tokens write the same rows.
                    let (dk, dv) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(kp.0.add(base), per),
                            std::slice::from_raw_parts_mut(vp.0.add(base), per),
                        )
                    };
                    this.store(layer, k, v, dk, dv, tmp);
                }
            });
    }

    /// Where `slot`'s rows of `layer` start in `k` and `v`.
    fn row_base(&self, layer: usize, slot: usize) -> usize {
        layer * self.layer_len() + slot * self.n_kv_heads * self.row
    }

    /// One token's K and V into its rows `dk`, `dv` (`n_kv_heads` rows each): keys shifted and
    /// scaled by the calibration, if any, rotated if the cache rotates, then quantized.
    fn store(
        &self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        dk: &mut [u16],
        dv: &mut [u16],
        tmp: &mut [f32],
    ) {
        let (hd, row, nkv) = (self.head_dim, self.row, self.n_kv_heads);
        let span = layer * nkv * hd..(layer + 1) * nkv * hd;
        let keys = self
            .keys
            .as_ref()
            .map(|k| (&k.shift[span.clone()], &k.scale[span]));
        for (src, dst, keys) in [(k, dk, keys), (v, dv, None)] {
            for (h, (x, out)) in src
                .chunks_exact(hd)
                .zip(dst.chunks_exact_mut(row))
                .enumerate()
            {
                if let Some((shift, scale)) = keys {
                    let r = h * hd..(h + 1) * hd;
                    for ((t, &x), (&m, &s)) in tmp
                        .iter_mut()
                        .zip(x)
                        .zip(shift[r.clone()].iter().zip(&scale[r]))
                    {
                        *t = (x - m) / s;
                    }
                } else if self.rotate {
                    tmp.copy_from_slice(x);
                } else {
                    quantize_row(self.kind, x, out);
                    continue;
                }
                if self.rotate {
                    rotate(tmp);
                }
                quantize_row(self.kind, tmp, out);
            }
        }
    }

    /// Layer `layer`'s K and V, to read.
    pub(crate) fn layer(&self, layer: usize) -> KvLayer<'_> {
        let len = self.layer_len();
        let r = layer * len..(layer + 1) * len;
        KvLayer {
            kind: self.kind,
            head_dim: self.head_dim,
            row: self.row,
            n_kv_heads: self.n_kv_heads,
            k: &self.k[r.clone()],
            v: &self.v[r],
            prefetch: self.row,
        }
    }

    /// Copy the K/V of `src` block into `dst` (copy-on-write of a shared partial block).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let per_block = self.block_size * self.n_kv_heads * self.row;
        for l in 0..self.n_layers {
            let s = l * self.layer_len() + src as usize * per_block;
            let d = l * self.layer_len() + dst as usize * per_block;
            self.k.copy_within(s..s + per_block, d);
            self.v.copy_within(s..s + per_block, d);
        }
    }
}

/// One layer's K and V as stored: rows of `row` `u16`s, one per (slot, KV head).
#[derive(Clone, Copy)]
pub struct KvLayer<'a> {
    pub kind: KvType,
    pub head_dim: usize,
    pub row: usize,
    n_kv_heads: usize,
    pub k: &'a [u16],
    pub v: &'a [u16],
    /// `u16`s from each row's start that the kernels prefetch (see [`Self::for_head_pass`]).
    pub(crate) prefetch: usize,
}

impl<'a> KvLayer<'a> {
    /// Rows of one KV head, back to back, or anywhere the caller's offsets say (for the
    /// kernels' tests and `examples/attention.rs`).
    pub fn of_rows(kind: KvType, head_dim: usize, k: &'a [u16], v: &'a [u16]) -> Self {
        KvLayer {
            kind,
            head_dim,
            row: kind.row_units(head_dim),
            n_kv_heads: 1,
            k,
            v,
            prefetch: kind.row_units(head_dim),
        }
    }

    /// The layer as the pass over one of a task's `heads` KV heads reads it. A slot's rows of
    /// those heads lie side by side, so the pass over the `first` prefetches all of them for
    /// each slot and the others prefetch nothing: a slot's rows are then fetched as one run of
    /// lines, which the memory system streams faster than scattered ones. (One head: its own
    /// rows, as by default.)
    pub fn for_head_pass(self, heads: usize, first: bool) -> Self {
        KvLayer {
            prefetch: if first { heads * self.row } else { 0 },
            ..self
        }
    }

    /// Where the row of `slot`, KV head `kvh` starts in `k` and `v`.
    #[inline]
    pub fn row_offset(&self, slot: usize, kvh: usize) -> usize {
        (slot * self.n_kv_heads + kvh) * self.row
    }

    /// The K row at `off`, dequantized (still rotated if the cache rotates).
    pub fn k_f32(&self, off: usize, out: &mut [f32]) {
        dequantize_row(self.kind, &self.k[off..off + self.row], out);
    }

    /// The V row at `off`, dequantized (still rotated if the cache rotates).
    pub fn v_f32(&self, off: usize, out: &mut [f32]) {
        dequantize_row(self.kind, &self.v[off..off + self.row], out);
    }
}

/// Positions of the calibration text [`key_calibration`] leaves out: the first, where LLMs
/// park attention they do not need (the "attention sink"), has keys unlike the rest.
const SINK_POSITIONS: usize = 1;

/// Key statistics of `model` over `tokens` (a calibration text, at most the model's context),
/// leaving out the first [`SINK_POSITIONS`]: per (layer, KV head, channel), the mean post-RoPE
/// key `m`, and the scale `s = sqrt(σ_k / rms_q)` (σ_k the keys' standard deviation, rms_q the
/// root mean square of the queries of that KV head's group; geometric mean 1 per head). One
/// forward pass with an f16 cache, whose keys are read back; queries are recorded on the way.
pub fn key_calibration(model: &Model, tokens: &[u32]) -> Result<KeyCalibration, ModelError> {
    let c = model.cfg();
    let n = tokens.len().min(c.context_length);
    if n <= SINK_POSITIONS {
        return Err(ModelError::Batch(format!(
            "key calibration needs more than {SINK_POSITIONS} tokens, got {n}"
        )));
    }
    const BS: usize = 16;
    let table: Vec<u32> = (0..n.div_ceil(BS) as u32).collect();
    let mut kv = KvCache::new(c, BS, table.len());
    let positions: Vec<u32> = (0..n as u32).collect();
    let seqs = [SeqSpan {
        start: 0,
        len: n,
        block_table: &table,
    }];
    let batch = Batch {
        tokens: &tokens[..n],
        positions: &positions,
        seqs: &seqs,
        logits_for: &[],
        adapters: &[],
    };
    let mut s = Scratch::new();
    s.activations = Some(crate::ActivationStats::default());
    model.forward(&batch, &mut kv, &mut s)?;
    let (hd, nkv, q_dim) = (c.head_dim, c.n_kv_heads, c.q_dim());
    let group = c.n_heads / nkv;
    let size = c.n_layers * nkv * hd;
    let (mut sum, mut sum2) = (vec![0f64; size], vec![0f64; size]);
    let mut row = vec![0f32; hd];
    for (l, (sum, sum2)) in sum
        .chunks_exact_mut(nkv * hd)
        .zip(sum2.chunks_exact_mut(nkv * hd))
        .enumerate()
    {
        let kl = kv.layer(l);
        for p in SINK_POSITIONS..n {
            for (h, (sum, sum2)) in sum
                .chunks_exact_mut(hd)
                .zip(sum2.chunks_exact_mut(hd))
                .enumerate()
            {
                kl.k_f32(kl.row_offset(p, h), &mut row);
                for ((s, s2), &x) in sum.iter_mut().zip(sum2.iter_mut()).zip(&row) {
                    *s += f64::from(x);
                    *s2 += f64::from(x) * f64::from(x);
                }
            }
        }
    }
    let count = (n - SINK_POSITIONS) as f64;
    let shift: Vec<f32> = sum.iter().map(|&s| (s / count) as f32).collect();
    let acts = s.activations.take().unwrap_or_default();
    let mut scale = vec![1f32; size];
    for (l, scale) in scale.chunks_exact_mut(nkv * hd).enumerate() {
        let Some((q2, qn)) = acts.sites.get(&(l, crate::Site::Qkv)) else {
            continue;
        };
        for (h, scale) in scale.chunks_exact_mut(hd).enumerate() {
            let at = (l * nkv + h) * hd;
            let ratio: Vec<f64> = (0..hd)
                .map(|ch| {
                    let m = sum[at + ch] / count;
                    let var = (sum2[at + ch] / count - m * m).max(0.0);
                    let q = (0..group)
                        .map(|g| q2[(h * group + g) * hd + ch])
                        .sum::<f64>()
                        / (group as f64 * *qn as f64);
                    debug_assert!((h * group + group) * hd <= q_dim);
                    (var.sqrt() + 1e-6) / (q.sqrt() + 1e-6)
                })
                .collect();
            // sqrt(σ_k / rms_q), bounded to [1/16, 16] of its geometric mean over the head.
            let log_mean = ratio.iter().map(|r| 0.5 * r.ln()).sum::<f64>() / hd as f64;
            for (s, r) in scale.iter_mut().zip(&ratio) {
                *s = (0.5 * r.ln() - log_mean)
                    .clamp(-16f64.ln(), 16f64.ln())
                    .exp() as f32;
            }
        }
    }
    Ok(KeyCalibration { shift, scale })
}

/// The bytes of `u16`s (quants are stored two or four to a `u16`).
pub(crate) fn bytes_of(x: &[u16]) -> &[u8] {
    // SAFETY: u8 has no alignment or validity requirement; the length covers the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len() * 2) }
}

fn bytes_of_mut(x: &mut [u16]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len() * 2) }
}

/// `x` (one head, `head_dim` values) into `out` (`kind.row_units(head_dim)` `u16`s), rounding
/// to nearest. A block's scale is rounded to f16 first and the quants are taken against that
/// rounded scale, so dequantizing reproduces each value to within half a step.
pub fn quantize_row(kind: KvType, x: &[f32], out: &mut [u16]) {
    debug_assert_eq!(out.len(), kind.row_units(x.len()));
    let nb = x.len() / QK;
    let to16 = |d: f32| half::f16::from_f32(d);
    match kind {
        KvType::F16 => crate::simd::to_f16(x, out),
        KvType::Q8_0 => {
            let (scales, qs) = out.split_at_mut(nb);
            let qs = bytes_of_mut(qs);
            for ((blk, s), q) in x.chunks_exact(QK).zip(scales).zip(qs.chunks_exact_mut(QK)) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = to16(amax / 127.0);
                *s = d.to_bits();
                let d = d.to_f32();
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                for (qi, &v) in q.iter_mut().zip(blk) {
                    *qi = (v * id).round().clamp(-127.0, 127.0) as i8 as u8;
                }
            }
        }
        KvType::Q4_0 => {
            let (scales, qs) = out.split_at_mut(nb);
            let qs = bytes_of_mut(qs);
            for ((blk, s), q) in x
                .chunks_exact(QK)
                .zip(scales)
                .zip(qs.chunks_exact_mut(QK / 2))
            {
                let (d, qv) = q4_block(blk.try_into().expect("a block of QK values"));
                *s = half::f16::from_f32(d).to_bits();
                q.copy_from_slice(&qv);
            }
        }
    }
}

/// One q4_0 block: its scale and quants (byte `i`: element `i` in the low nibble, element
/// `i + 16` in the high one; value `Q4_LEVELS[q] · d`). The scale is the least-squares one for
/// the quants of the best of a few candidate grids (the largest magnitude mapped near -127,
/// the grid's end, as llama.cpp's IQ4_NL quantizer searches). Every token writes one block
/// per 32 values of each K and V head, so each candidate's quants and sums are one vectorized
/// pass ([`crate::simd::q4_stats`]); the search with a binary search per value took 37% of a
/// 16-stream server's time (BENCHMARKS.md).
fn q4_block(x: &[f32; QK]) -> (f32, [u8; QK / 2]) {
    let m = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let mut q = [0x88u8; QK / 2];
    if m == 0.0 {
        return (0.0, q);
    }
    // The largest magnitude mapped near the grid's end, -127 (as llama.cpp's IQ4_NL search).
    // Error with the least-squares scale: Σx² − (Σxq)²/Σq²; maximize the subtrahend.
    let scales: [f32; 15] = std::array::from_fn(|t| (-134.0 + 2.0 * t as f32) / m);
    let mut stats = [[0f32; 2]; 15];
    crate::simd::q4_stats(x, &scales, &mut stats, None);
    let mut best = (f32::NEG_INFINITY, -127.0 / m, None);
    for (&is, &[sxq, sqq]) in scales.iter().zip(&stats) {
        if sqq > 0.0 && sxq * sxq / sqq > best.0 {
            best = (sxq * sxq / sqq, is, Some([sxq, sqq]));
        }
    }
    let [sxq, sqq] = best.2.unwrap_or_else(|| {
        let mut s = [[0f32; 2]];
        crate::simd::q4_stats(x, &[best.1], &mut s, None);
        s[0]
    });
    let d = half::f16::from_f32(sxq / sqq).to_f32();
    // Quants against the stored (f16) scale.
    let is = if d != 0.0 { 1.0 / d } else { best.1 };
    crate::simd::q4_stats(x, &[is], &mut [[0f32; 2]], Some(&mut q));
    (d, q)
}

/// A row written by [`quantize_row`] back to `head_dim` f32 values.
pub fn dequantize_row(kind: KvType, row: &[u16], out: &mut [f32]) {
    let nb = out.len() / QK;
    match kind {
        KvType::F16 => crate::simd::f16_to_f32(row, out),
        KvType::Q8_0 => {
            let (scales, qs) = row.split_at(nb);
            let qs = bytes_of(qs);
            for ((o, &s), q) in out
                .chunks_exact_mut(QK)
                .zip(scales)
                .zip(qs.chunks_exact(QK))
            {
                let d = half::f16::from_bits(s).to_f32();
                for (oi, &qi) in o.iter_mut().zip(q) {
                    *oi = d * f32::from(qi as i8);
                }
            }
        }
        KvType::Q4_0 => {
            let (scales, qs) = row.split_at(nb);
            let qs = bytes_of(qs);
            for ((o, &s), q) in out
                .chunks_exact_mut(QK)
                .zip(scales)
                .zip(qs.chunks_exact(QK / 2))
            {
                let d = half::f16::from_bits(s).to_f32();
                let lv = &Q4_LEVELS;
                for (i, &b) in q.iter().enumerate() {
                    o[i] = d * f32::from(lv[usize::from(b & 15)]);
                    o[i + QK / 2] = d * f32::from(lv[usize::from(b >> 4)]);
                }
            }
        }
    }
}

/// The 16 values a q4_0 KV quant stands for (times its block's scale): llama.cpp's IQ4_NL
/// grid, denser near zero, where most of a rotated head's values are (they are close to
/// Gaussian). Against the uniform grid `-8..=7` it lowered the KL divergence from f16 KV on
/// SmolLM2 over 8,192 tokens from 0.048 to 0.040 and the perplexity loss from +3.2% to +2.8%
/// (BENCHMARKS.md, "KV cache types"); the bits per value stay 4.5.
pub(crate) const Q4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The midpoints between neighbouring [`Q4_LEVELS`], then +∞ (16 lanes for one register): a
/// value goes to the level whose interval holds it, its index the number of midpoints below it.
pub(crate) static Q4_MIDS: [f32; 16] = {
    let mut m = [f32::INFINITY; 16];
    let mut i = 0;
    while i < 15 {
        m[i] = 0.5 * (Q4_LEVELS[i] as f32 + Q4_LEVELS[i + 1] as f32);
        i += 1;
    }
    m
};

/// `x ← H·x`, the rotation the cache applies to every stored head and the attention to q.
pub fn rotate(x: &mut [f32]) {
    hadamard(x);
}

/// The inverse of [`rotate`] (`H` is its own inverse), for the attention's output.
pub fn unrotate(x: &mut [f32]) {
    hadamard(x);
}

/// `x ← H·x` with `H` the normalized Walsh–Hadamard matrix of order `x.len()` (a power of two):
/// orthonormal and its own inverse. Fast transform: log2(n) rounds of butterflies, then 1/√n.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for pair in x.chunks_exact_mut(2 * h) {
            let (a, b) = pair.split_at_mut(h);
            for (u, w) in a.iter_mut().zip(b) {
                let (s, d) = (*u + *w, *u - *w);
                *u = s;
                *w = d;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * (1.0 + (i % 7) as f32))
            .collect()
    }

    #[test]
    fn hadamard_is_orthonormal_and_its_own_inverse() {
        for n in [1, 2, 32, 64, 128, 256] {
            // Columns of H are orthonormal: H·e_i · H·e_j = δ_ij.
            let cols: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let mut e = vec![0.0; n];
                    e[i] = 1.0;
                    hadamard(&mut e);
                    e
                })
                .collect();
            for i in 0..n {
                for j in 0..n {
                    let d: f32 = cols[i].iter().zip(&cols[j]).map(|(a, b)| a * b).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-5, "n={n} ({i},{j}): {d}");
                }
            }
            // Round trip, and dot products kept.
            let (x, y) = (signal(n, 0.0), signal(n, 3.0));
            let (mut hx, mut hy) = (x.clone(), y.clone());
            hadamard(&mut hx);
            hadamard(&mut hy);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
            assert!((dot(&x, &y) - dot(&hx, &hy)).abs() <= 1e-4 * dot(&x, &x).max(1.0));
            hadamard(&mut hx);
            for (a, b) in x.iter().zip(&hx) {
                assert!((a - b).abs() < 1e-5, "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn hadamard_spreads_an_outlier() {
        let mut x = vec![0.01; 64];
        x[5] = 100.0;
        hadamard(&mut x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(amax < 100.0 / 8.0 + 0.1, "{amax}");
    }

    /// Each block type reproduces every value to within half its block's step (plus the f16
    /// rounding of the scale), and the row takes the advertised size.
    #[test]
    fn block_quantize_dequantize_round_trip() {
        for hd in [32, 64, 128, 256] {
            let mut x = signal(hd, 1.5);
            x[3] = -40.0; // an outlier sets its block's scale
                          // q4_0: the largest magnitude maps to -8 exactly, but a value near it of the other
                          // sign clamps at +7, up to one whole step off (as in ggml).
            for (kind, levels, bits, tol) in [
                (KvType::Q8_0, 127.0, 8.5, 0.5),
                (KvType::Q4_0, 8.0, 4.5, 1.0),
            ] {
                let mut row = vec![0u16; kind.row_units(hd)];
                assert_eq!(row.len() * 16, (bits * hd as f64) as usize);
                quantize_row(kind, &x, &mut row);
                let mut back = vec![0.0; hd];
                dequantize_row(kind, &row, &mut back);
                for (b, blk) in x.chunks(QK).enumerate() {
                    let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = amax / levels;
                    for (i, (&a, &r)) in blk.iter().zip(&back[b * QK..]).enumerate() {
                        assert!(
                            (a - r).abs() <= tol * step * 1.01 + 1e-6,
                            "{kind} hd={hd} block {b} elem {i}: {a} vs {r} (step {step})"
                        );
                    }
                }
            }
            // f16 rows are f16 rounding.
            let mut row = vec![0u16; hd];
            quantize_row(KvType::F16, &x, &mut row);
            let mut back = vec![0.0; hd];
            dequantize_row(KvType::F16, &row, &mut back);
            for (a, r) in x.iter().zip(&back) {
                assert_eq!(half::f16::from_f32(*a).to_f32(), *r);
            }
        }
    }

    #[test]
    fn q4_0_packs_as_ggml_iq4_nl_blocks() {
        // Values on the grid of scale 2: element i is 2·L[i], element 16 + i is 2·L[15 - i].
        let l: Vec<usize> = (0..16).chain((0..16).map(|i| 15 - i)).collect();
        let x: Vec<f32> = l.iter().map(|&i| 2.0 * f32::from(Q4_LEVELS[i])).collect();
        let mut row = vec![0u16; KvType::Q4_0.row_units(32)];
        quantize_row(KvType::Q4_0, &x, &mut row);
        assert_eq!(half::f16::from_bits(row[0]).to_f32(), 2.0);
        // Byte i: element i in its low nibble, element i + 16 in its high one.
        for (i, &b) in bytes_of(&row[1..]).iter().enumerate() {
            assert_eq!((b & 15, b >> 4), (i as u8, 15 - i as u8), "byte {i}");
        }
        let mut back = vec![0.0; 32];
        dequantize_row(KvType::Q4_0, &row, &mut back);
        assert_eq!(back, x);
    }

    /// q4_0's non-uniform grid and scale search lower the squared error against ggml's plain
    /// q4_0 (uniform grid, largest magnitude → -8) on Gaussian values, which is what rotated
    /// heads look like.
    #[test]
    fn q4_0_scale_search_beats_the_max_grid() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut searched, mut plain) = (0f64, 0f64);
        for _ in 0..2000 {
            let x: [f32; QK] = std::array::from_fn(|_| {
                let (u, v) = (uniform().max(1e-12), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            });
            let (d, q) = q4_block(&x);
            let lv = |i: usize| {
                let b = q[i % 16];
                f32::from(Q4_LEVELS[usize::from(if i < 16 { b & 15 } else { b >> 4 })])
            };
            let m = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d0 = half::f16::from_f32(m / -8.0).to_f32();
            for (i, &v) in x.iter().enumerate() {
                searched += f64::from(v - d * lv(i)).powi(2);
                let l = (v / d0).round().clamp(-8.0, 7.0);
                plain += f64::from(v - d0 * l).powi(2);
            }
        }
        let ratio = searched / plain;
        eprintln!("q4_0 squared error, non-uniform searched / uniform plain grid: {ratio:.3}");
        assert!(ratio < 0.85, "{ratio}");
    }

    /// The rotation the cache applies is undone exactly by its inverse and keeps dot products.
    #[test]
    fn rotate_is_orthonormal_and_unrotate_inverts_it() {
        for n in [32, 64, 128, 256] {
            let (x, y) = (signal(n, 0.25), signal(n, 2.0));
            let (mut rx, mut ry) = (x.clone(), y.clone());
            rotate(&mut rx);
            rotate(&mut ry);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
            assert!((dot(&x, &y) - dot(&rx, &ry)).abs() <= 1e-4 * dot(&x, &x));
            unrotate(&mut rx);
            for (a, b) in x.iter().zip(&rx) {
                assert!((a - b).abs() < 1e-5, "n={n}: {a} vs {b}");
            }
        }
    }

    /// Attention over q4_0 rows stored rotated (q rotated, output un-rotated, as `ops::attention`
    /// does) stays close to exact attention on the unquantized values, and closer than
    /// without the rotation on heads with an outlier channel; forgetting to un-rotate the output
    /// is far off. Held against an f64 reference.
    #[test]
    fn rotated_q4_0_attention_matches_exact_attention() {
        let (hd, n) = (64, 48);
        let mut gauss = crate::ops::tests::gaussian(0x9e37_79b9_7f4a_7c15);
        let mut head = |outlier: f32| -> Vec<f32> {
            let mut h: Vec<f32> = (0..hd).map(|_| gauss()).collect();
            h[7] += outlier;
            h
        };
        let q = head(0.0);
        let ks: Vec<Vec<f32>> = (0..n).map(|_| head(12.0)).collect();
        let vs: Vec<Vec<f32>> = (0..n).map(|_| head(12.0)).collect();
        let attend = |q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>]| -> Vec<f64> {
            let s: Vec<f64> = ks
                .iter()
                .map(|k| {
                    q.iter()
                        .zip(k)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                        / 8.0
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let mut o = vec![0f64; hd];
            for (wj, v) in w.iter().zip(vs) {
                for (oi, &vi) in o.iter_mut().zip(v) {
                    *oi += wj / z * f64::from(vi);
                }
            }
            o
        };
        let exact = attend(&q, &ks, &vs);
        let through_q4 = |x: &[f32], rot: bool| -> Vec<f32> {
            let mut t = x.to_vec();
            if rot {
                rotate(&mut t);
            }
            let mut row = vec![0u16; KvType::Q4_0.row_units(hd)];
            quantize_row(KvType::Q4_0, &t, &mut row);
            dequantize_row(KvType::Q4_0, &row, &mut t);
            t
        };
        let err = |o: &[f32]| -> f64 {
            let num: f64 = o
                .iter()
                .zip(&exact)
                .map(|(&a, b)| (f64::from(a) - b).powi(2))
                .sum();
            (num / exact.iter().map(|b| b * b).sum::<f64>()).sqrt()
        };
        let run = |rot: bool, undo: bool| -> Vec<f32> {
            let kq: Vec<Vec<f32>> = ks.iter().map(|k| through_q4(k, rot)).collect();
            let vq: Vec<Vec<f32>> = vs.iter().map(|v| through_q4(v, rot)).collect();
            let mut qr = q.clone();
            if rot {
                rotate(&mut qr);
            }
            let mut o: Vec<f32> = attend(&qr, &kq, &vq).iter().map(|&x| x as f32).collect();
            if rot && undo {
                unrotate(&mut o);
            }
            o
        };
        let (rotated, plain, forgot) = (
            err(&run(true, true)),
            err(&run(false, false)),
            err(&run(true, false)),
        );
        eprintln!("relative error: rotated {rotated:.4}, unrotated {plain:.4}, output not un-rotated {forgot:.4}");
        assert!(rotated < 0.05, "{rotated}");
        assert!(rotated < plain, "{rotated} vs {plain}");
        assert!(forgot > 0.5, "{forgot}");
    }

    #[test]
    fn zero_blocks_stay_zero() {
        for kind in KV_TYPES {
            let x = vec![0.0; 64];
            let mut row = vec![7u16; kind.row_units(64)];
            quantize_row(kind, &x, &mut row);
            let mut back = vec![1.0; 64];
            dequantize_row(kind, &row, &mut back);
            assert!(back.iter().all(|&v| v == 0.0), "{kind}");
        }
    }

    #[test]
    fn kv_type_names_parse_and_refuse() {
        for t in KV_TYPES {
            assert_eq!(t.name().parse::<KvType>(), Ok(t));
        }
        assert_eq!("Q8_0".parse::<KvType>(), Ok(KvType::Q8_0));
        let e = "q5_0".parse::<KvType>().expect_err("q5_0 is no KV type");
        assert!(e.contains("q5_0") && e.contains("f16, q8_0, q4_0"), "{e}");
        assert_eq!(KvType::Q8_0.refuses(96), None);
        assert!(KvType::Q4_0.refuses(96).is_some());
        assert!(KvType::Q8_0.refuses(80).is_some());
        assert_eq!(KvType::F16.refuses(80), None);
    }
}
