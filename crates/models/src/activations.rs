//! Activation statistics for importance matrices (llama.cpp's imatrix): for each weight
//! matrix's input, the sum over tokens of each column's square, and the token count.
//!
//! The forward pass records them when [`crate::Scratch::activations`] is set: at the four
//! places per layer where a normalized or mixed activation enters matrix products. Which
//! GGUF tensors read each site (q, k and v all read the attention input) is the caller's
//! mapping: the model stays free of tensor names.

use std::collections::BTreeMap;

/// Where in a layer an activation enters weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Site {
    /// The normalized input of attention: read by q, k and v (or the fused qkv).
    AttnIn,
    /// The attention heads' output: read by the output projection.
    AttnOut,
    /// The normalized input of the feed-forward: read by gate and up.
    FfnIn,
    /// The gated hidden state: read by down.
    FfnDownIn,
    /// q, k and v of every head after RoPE (the attention's inputs; no weight matrix reads
    /// them): the KV cache's calibration ([`crate::kv_cache::key_calibration`]) takes the
    /// queries' magnitudes from here.
    Qkv,
}

/// Per (layer, site): Σ x² per column (f64) and the tokens seen.
#[derive(Debug, Default, Clone)]
pub struct ActivationStats {
    pub sites: BTreeMap<(usize, Site), (Vec<f64>, u64)>,
}

impl ActivationStats {
    /// Add `n` rows of `cols` values (row-major in `x`).
    pub fn add(&mut self, layer: usize, site: Site, x: &[f32], cols: usize) {
        let (sum, count) = self
            .sites
            .entry((layer, site))
            .or_insert_with(|| (vec![0.0; cols], 0));
        for row in x.chunks_exact(cols) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
            *count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_squares_per_column_and_counts_rows() {
        let mut a = ActivationStats::default();
        a.add(0, Site::FfnIn, &[1.0, -2.0, 3.0, 0.5], 2);
        a.add(0, Site::FfnIn, &[2.0, 0.0], 2);
        let (s, n) = &a.sites[&(0, Site::FfnIn)];
        assert_eq!(s, &vec![14.0, 4.25]);
        assert_eq!(*n, 3);
    }
}
