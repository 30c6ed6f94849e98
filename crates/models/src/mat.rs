//! The one wrapper around the `gemm` crate's f32 matrix product, for every caller: inference
//! attention and prefill panels (`ops`, `quant`), the BERT encoder, and training (`ferrolm-train`).
//!
//! `gemm::gemm` takes seventeen arguments, raw pointers and strides. Here operands are slices
//! with strides ([`Mat`]), bounds are checked once, and the pointer call is written once.

/// A matrix operand: base slice and (row, column) strides in elements.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }

    /// The transpose (a view).
    pub fn t(self) -> Self {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether an (r × c) matrix with these strides fits in `data`.
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// Threads for one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// On the calling thread: the caller is already inside a parallel loop.
    Serial,
    /// Split over rayon's pool (serial when the pool has one thread).
    Pool,
}

impl Par {
    fn gemm(self) -> gemm::Parallelism {
        match (self, rayon::current_num_threads()) {
            (Par::Serial, _) | (Par::Pool, 0 | 1) => gemm::Parallelism::None,
            (Par::Pool, n) => gemm::Parallelism::Rayon(n),
        }
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] scale · lhs (m×k) · rhs (k×n)`.
///
/// Panics if an operand is too short for its shape and strides (a caller's bug).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    (m, n, k): (usize, usize, usize),
    acc: bool,
    scale: f32,
    par: Par,
) {
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "matrix product out of bounds"
    );
    // SAFETY: the assert bounds every element written; `dst` is a unique borrow and so
    // cannot alias the shared `lhs` / `rhs`.
    unsafe {
        gemm_to_ptr(
            dst.as_mut_ptr(),
            dst_rs,
            lhs,
            rhs,
            (m, n, k),
            acc,
            scale,
            par,
        )
    }
}

/// [`gemm`] into a raw destination: for parallel callers whose threads write disjoint
/// column blocks of one shared output, which no `&mut` slice can express.
///
/// # Safety
/// `dst` must be valid for writes of the m × n block at row stride `dst_rs`, and no other
/// thread may read or write that block during the call. The operands are bounds-checked.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_to_ptr(
    dst: *mut f32,
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    (m, n, k): (usize, usize, usize),
    acc: bool,
    scale: f32,
    par: Par,
) {
    assert!(
        lhs.fits(m, k) && rhs.fits(k, n),
        "matrix product operand out of bounds"
    );
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        if acc { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        par.gemm(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_and_transposed_operands_match_a_naive_product() {
        // lhs 2×3 row-major, rhs = (3×2)ᵀ view of a 2×3 matrix.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5];
        let mut y = [0f32; 4];
        let (a, w) = (Mat::rows(&a, 3), Mat::rows(&w, 3).t());
        gemm(&mut y, 2, a, w, (2, 2, 3), false, 1.0, Par::Serial);
        assert_eq!(y, [-2.0, 5.5, -2.0, 16.0]);
        // Accumulate, scaled, on the pool.
        gemm(&mut y, 2, a, w, (2, 2, 3), true, 2.0, Par::Pool);
        assert_eq!(y, [-6.0, 16.5, -6.0, 48.0]);
    }

    #[test]
    #[should_panic(expected = "operand out of bounds")]
    fn a_short_operand_is_refused_before_any_read() {
        let a = [1.0f32; 5];
        let mut y = [0f32; 4];
        gemm(
            &mut y,
            2,
            Mat::rows(&a, 3),
            Mat::rows(&a, 2),
            (2, 2, 3),
            false,
            1.0,
            Par::Serial,
        );
    }
}
