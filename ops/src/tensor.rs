//! The load boundary: weight matrices of any supported type behind one type, and the
//! activation batch they multiply, prepared once per format however many matrices read it.
//!
//! A [`Matrix`] borrows its bytes from the model file's storage (no copy) or owns them.
//! Dispatch from [`WeightType`] to the generic kernels happens here, in one exhaustive
//! `match` per operation.

use std::ops::Range;

use std::sync::Arc;

use half::{bf16, f16};

use crate::gguf::{GgufFile, TensorInfo};
use crate::matmul;
use crate::pod::{Pod, as_bytes, cast_slice};
use crate::pool::ThreadPool;
use crate::quant::*;
use crate::simd::SimdLevel;
use crate::storage::{AlignedBytes, Storage};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("tensor {name:?} has type {dtype}, which the CPU kernels do not support")]
    UnsupportedType {
        name: String,
        dtype: crate::GgmlType,
    },
    #[error("tensor {name:?} has shape {dims:?}, expected {expected}")]
    Shape {
        name: String,
        dims: Vec<u64>,
        expected: String,
    },
    #[error("tensor {name:?} data is not aligned for its type")]
    Misaligned { name: String },
}

/// `n_rows` rows of `n_cols` values of one weight type; row `r` computes output `r`.
#[derive(Clone)]
pub struct Matrix {
    wtype: WeightType,
    n_rows: usize,
    n_cols: usize,
    storage: Arc<Storage>,
    offset: usize,
    n_bytes: usize,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Matrix({:?}, {}x{})",
            self.wtype, self.n_rows, self.n_cols
        )
    }
}

/// Calls `$body` with `$W` bound to the block type of `$wtype`.
macro_rules! with_block {
    ($wtype:expr, $W:ident => $body:expr) => {
        match $wtype {
            WeightType::F32 => {
                type $W = f32;
                $body
            }
            WeightType::F16 => {
                type $W = f16;
                $body
            }
            WeightType::BF16 => {
                type $W = bf16;
                $body
            }
            WeightType::Q4_0 => {
                type $W = BlockQ4_0;
                $body
            }
            WeightType::Q4_1 => {
                type $W = BlockQ4_1;
                $body
            }
            WeightType::Q5_0 => {
                type $W = BlockQ5_0;
                $body
            }
            WeightType::Q5_1 => {
                type $W = BlockQ5_1;
                $body
            }
            WeightType::Q8_0 => {
                type $W = BlockQ8_0;
                $body
            }
            WeightType::Q4_K => {
                type $W = BlockQ4K;
                $body
            }
            WeightType::Q5_K => {
                type $W = BlockQ5K;
                $body
            }
            WeightType::Q6_K => {
                type $W = BlockQ6K;
                $body
            }
            WeightType::Q2_K => {
                type $W = BlockQ2K;
                $body
            }
            WeightType::Q3_K => {
                type $W = BlockQ3K;
                $body
            }
            WeightType::IQ4_NL => {
                type $W = BlockIQ4NL;
                $body
            }
            WeightType::IQ4_XS => {
                type $W = BlockIQ4XS;
                $body
            }
        }
    };
}

impl Matrix {
    /// The 2-D tensor `info` of `file` (GGUF dims `[n_cols, n_rows]`), without copying.
    pub fn from_gguf(file: &GgufFile, info: &TensorInfo) -> Result<Self, TensorError> {
        let wtype =
            WeightType::from_ggml(info.dtype).ok_or_else(|| TensorError::UnsupportedType {
                name: info.name.clone(),
                dtype: info.dtype,
            })?;
        let (n_cols, n_rows) = match info.dims.as_slice() {
            &[c, r] => (c as usize, r as usize),
            &[c, r, 1] | &[c, r, 1, 1] => (c as usize, r as usize),
            dims => {
                return Err(TensorError::Shape {
                    name: info.name.clone(),
                    dims: dims.to_vec(),
                    expected: "a matrix [n_cols, n_rows]".into(),
                });
            }
        };
        let range = file.tensor_range(info);
        let m = Self {
            wtype,
            n_rows,
            n_cols,
            storage: file.storage().clone(),
            offset: range.start,
            n_bytes: range.len(),
        };
        let aligned = with_block!(wtype, W => cast_slice::<W>(m.bytes()).is_some());
        if !aligned {
            return Err(TensorError::Misaligned {
                name: info.name.clone(),
            });
        }
        Ok(m)
    }

    /// A matrix owning `blocks` (`n_rows` rows of `n_cols` values).
    pub fn from_blocks<W: WeightBlock + Pod>(
        wtype: WeightType,
        blocks: &[W],
        n_rows: usize,
        n_cols: usize,
    ) -> Self {
        assert_eq!(
            wtype.ggml(),
            W::DTYPE,
            "weight type must match the block type"
        );
        assert!(n_cols.is_multiple_of(W::LEN) && blocks.len() * W::LEN == n_rows * n_cols);
        let bytes = as_bytes(blocks);
        Self {
            wtype,
            n_rows,
            n_cols,
            storage: Arc::new(Storage::Heap(AlignedBytes::from_slice(bytes))),
            offset: 0,
            n_bytes: bytes.len(),
        }
    }

    /// A matrix owning a copy of `bytes`: `n_rows` rows of `n_cols` values of `wtype`, as
    /// [`Self::bytes`] gives them (what a device receives in an upload). `None` when the
    /// length does not match or rows are not whole blocks.
    pub fn from_bytes(
        wtype: WeightType,
        n_rows: usize,
        n_cols: usize,
        bytes: &[u8],
    ) -> Option<Self> {
        let expected = with_block!(wtype, W => {
            if !n_cols.is_multiple_of(W::LEN) {
                return None;
            }
            (n_rows * n_cols / W::LEN).checked_mul(size_of::<W>())?
        });
        (bytes.len() == expected).then(|| Self {
            wtype,
            n_rows,
            n_cols,
            storage: Arc::new(Storage::Heap(AlignedBytes::from_slice(bytes))),
            offset: 0,
            n_bytes: bytes.len(),
        })
    }

    /// Quantizes row-major f32 values (`n_rows` × `n_cols`) to `wtype`.
    pub fn quantize(wtype: WeightType, values: &[f32], n_rows: usize, n_cols: usize) -> Self {
        assert_eq!(values.len(), n_rows * n_cols);
        with_block!(wtype, W => {
            let mut blocks = vec![W::default(); values.len() / W::LEN];
            W::quantize(values, &mut blocks);
            Self::from_blocks(wtype, &blocks, n_rows, n_cols)
        })
    }

    pub fn wtype(&self) -> WeightType {
        self.wtype
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// Bytes of weights (what one full product reads).
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    pub fn bytes(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.n_bytes]
    }

    fn blocks<W: Pod>(&self) -> &[W] {
        cast_slice(self.bytes()).expect("alignment and length checked at construction")
    }

    /// A new matrix (owning its bytes) of the given rows, in that order.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Matrix, TensorError> {
        let row_bytes = self.n_bytes / self.n_rows.max(1);
        let mut bytes = AlignedBytes::zeroed(row_bytes * rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            if r >= self.n_rows {
                return Err(TensorError::Shape {
                    name: format!("row {r}"),
                    dims: vec![self.n_cols as u64, self.n_rows as u64],
                    expected: format!("a row below {}", self.n_rows),
                });
            }
            bytes.as_mut_slice()[i * row_bytes..(i + 1) * row_bytes]
                .copy_from_slice(&self.bytes()[r * row_bytes..(r + 1) * row_bytes]);
        }
        Ok(Matrix {
            wtype: self.wtype,
            n_rows: rows.len(),
            n_cols: self.n_cols,
            n_bytes: bytes.as_slice().len(),
            storage: Arc::new(Storage::Heap(bytes)),
            offset: 0,
        })
    }

    /// Rows `rows` as a matrix of their own, sharing this one's bytes (no copy). Row `r`
    /// of the view is row `rows.start + r` here, with the same bits in every product.
    pub fn rows(&self, rows: Range<usize>) -> Matrix {
        assert!(
            rows.start <= rows.end && rows.end <= self.n_rows,
            "rows {rows:?} of a matrix of {}",
            self.n_rows
        );
        let row_bytes = self.n_bytes / self.n_rows.max(1);
        Matrix {
            wtype: self.wtype,
            n_rows: rows.len(),
            n_cols: self.n_cols,
            storage: self.storage.clone(),
            offset: self.offset + rows.start * row_bytes,
            n_bytes: rows.len() * row_bytes,
        }
    }

    /// Whether this matrix alone holds its buffer (a copy made by [`Matrix::select_rows`],
    /// [`Matrix::transposed_as`] and the like, rather than a view of a file or of a
    /// [`Matrix::pack`]).
    pub fn owns_storage(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// `matrices` copied into one new buffer, each at a cache-line-aligned offset, in the
    /// same order. Weights made at load (transposed or renumbered per layer) are small
    /// buffers each; one buffer for all of them is large enough for huge pages (see
    /// [`AlignedBytes::zeroed`]), which scattered rows read much faster.
    pub fn pack(matrices: &[&Matrix]) -> Vec<Matrix> {
        let align = |n: usize| n.next_multiple_of(crate::storage::HEAP_ALIGN);
        let total = matrices.iter().map(|m| align(m.n_bytes)).sum();
        let mut bytes = AlignedBytes::zeroed(total);
        let mut offsets = Vec::with_capacity(matrices.len());
        let mut at = 0;
        for m in matrices {
            bytes.as_mut_slice()[at..at + m.n_bytes].copy_from_slice(m.bytes());
            offsets.push(at);
            at += align(m.n_bytes);
        }
        let storage = Arc::new(Storage::Heap(bytes));
        matrices
            .iter()
            .zip(offsets)
            .map(|(m, offset)| Matrix {
                wtype: m.wtype,
                n_rows: m.n_rows,
                n_cols: m.n_cols,
                storage: storage.clone(),
                offset,
                n_bytes: m.n_bytes,
            })
            .collect()
    }

    /// Row `r` as f32 values (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n_rows && out.len() == self.n_cols);
        with_block!(self.wtype, W => {
            let bpr = self.n_cols / W::LEN;
            W::dequantize(&self.blocks::<W>()[r * bpr..(r + 1) * bpr], out);
        })
    }

    /// `out[t][r] = row r · x_t` for every token row of `x` (`out` is `x.n_tok()` rows of
    /// `n_rows`).
    pub fn matmul(&self, pool: &ThreadPool, x: &mut Activations, out: &mut [f32]) {
        assert_eq!(
            x.n_cols, self.n_cols,
            "activation width must equal the matrix width"
        );
        assert_eq!(out.len(), x.n_tok * self.n_rows);
        let n_tok = x.n_tok;
        with_block!(self.wtype, W => {
            let prepared = x.prepared::<W>();
            let w = self.blocks::<W>();
            if n_tok == 1 {
                matmul::matvec(pool, w, prepared, out);
            } else {
                matmul::matmat(pool, w, prepared, n_tok, out);
            }
        })
    }
}

/// Dot products of single rows of one matrix with the token rows of a prepared batch:
/// the type-erased view the neuron-sparse operators compute through.
pub trait RowDots: Sync {
    /// `out[k] = row (r0 + k) · x_t` for `k < out.len()`, with the bits of the dense
    /// product's rows.
    fn rows(&self, t: usize, r0: usize, out: &mut [f32]);

    /// `out[k] = row idx[k] · x_t` for scattered, increasing rows, with the same bits.
    fn rows_at(&self, t: usize, idx: &[u32], out: &mut [f32]) {
        for (o, &r) in out.iter_mut().zip(idx) {
            self.rows(t, r as usize, std::slice::from_mut(o));
        }
    }
}

/// Rows ahead of the current one whose loading a scattered-row loop asks for.
const PREFETCH_AHEAD: usize = 8;

/// `acc += h · row r` for single rows of one matrix.
pub trait RowAxpy: Sync {
    fn axpy(&self, r: usize, h: f32, acc: &mut [f32]);

    /// Values per weight block: column ranges given to [`Self::axpy_rows_cols`] start on
    /// a multiple of it.
    fn block_len(&self) -> usize;

    /// `acc += Σ h[j] · row rows[j] restricted to cols`, one row after the other in order,
    /// skipping `h[j] = 0`. Each column is computed on its own, so its bits are those of
    /// the same steps with [`Self::axpy`] on whole rows.
    fn axpy_rows_cols(&self, rows: &[u32], h: &[f32], cols: Range<usize>, acc: &mut [f32]);
}

struct TypedDots<'a, W: WeightBlock> {
    w: &'a [W],
    bpr: usize,
    xs: &'a [W::Prep],
    stride: usize,
    kernel: RowKernel<W>,
}

impl<W: WeightBlock> RowDots for TypedDots<'_, W> {
    fn rows(&self, t: usize, r0: usize, out: &mut [f32]) {
        let w = &self.w[r0 * self.bpr..(r0 + out.len()) * self.bpr];
        self.kernel
            .run(w, &self.xs[t * self.stride..(t + 1) * self.stride], out);
    }

    fn rows_at(&self, t: usize, idx: &[u32], out: &mut [f32]) {
        let a = &self.xs[t * self.stride..(t + 1) * self.stride];
        let bpr = self.bpr;
        match self.kernel {
            RowKernel::Dot(f) => {
                let row = |r: u32| &self.w[r as usize * bpr..(r as usize + 1) * bpr];
                for (o, &r) in out.iter_mut().zip(idx) {
                    *o = f(row(r), a);
                }
            }
            RowKernel::Rows(_, f) => f(self.w, bpr, idx, a, out),
        }
    }
}

struct TypedAxpy<'a, W: AxpyBlock> {
    w: &'a [W],
    bpr: usize,
    f: AxpyFn<W>,
}

impl<W: AxpyBlock> RowAxpy for TypedAxpy<'_, W> {
    fn axpy(&self, r: usize, h: f32, acc: &mut [f32]) {
        (self.f)(&self.w[r * self.bpr..(r + 1) * self.bpr], h, acc);
    }

    fn block_len(&self) -> usize {
        W::LEN
    }

    fn axpy_rows_cols(&self, rows: &[u32], h: &[f32], cols: Range<usize>, acc: &mut [f32]) {
        assert!(cols.start.is_multiple_of(W::LEN) && cols.len() == acc.len());
        let (b0, b1) = (cols.start / W::LEN, cols.end.div_ceil(W::LEN));
        assert!(b1 <= self.bpr && (b1 - b0) * W::LEN == acc.len());
        let part = |r: u32| {
            let row = r as usize * self.bpr;
            &self.w[row + b0..row + b1]
        };
        for (j, (&r, &hv)) in rows.iter().zip(h).enumerate() {
            if let Some(&next) = rows.get(j + PREFETCH_AHEAD) {
                crate::simd::prefetch(part(next));
            }
            if hv != 0.0 {
                (self.f)(part(r), hv, acc);
            }
        }
    }
}

impl Matrix {
    /// Calls `f` with this matrix's rows against `x`, which must have been prepared for
    /// this matrix's type ([`Activations::prepare_for`]).
    pub fn with_row_dots<R>(
        &self,
        x: &Activations,
        level: SimdLevel,
        f: impl FnOnce(&dyn RowDots) -> R,
    ) -> R {
        assert_eq!(
            x.n_cols, self.n_cols,
            "activation width must equal the matrix width"
        );
        with_block!(self.wtype, W => {
            let bpr = self.n_cols / W::LEN;
            let dots = TypedDots::<W> {
                w: self.blocks::<W>(),
                bpr,
                xs: x.prepared_ref::<W>(),
                stride: prep_len::<W>(bpr),
                kernel: W::row_kernel(level),
            };
            f(&dots)
        })
    }

    /// Calls `f` with this matrix's row axpy at `level`.
    pub fn with_row_axpy<R>(&self, level: SimdLevel, f: impl FnOnce(&dyn RowAxpy) -> R) -> R {
        with_block!(self.wtype, W => {
            let axpy = TypedAxpy::<W> {
                w: self.blocks::<W>(),
                bpr: self.n_cols / W::LEN,
                f: W::axpy_kernel(level),
            };
            f(&axpy)
        })
    }

    /// The matrix transposed, stored in the same weight type (dequantized, transposed and
    /// quantized again, so quantized types lose a little).
    pub fn transposed(&self) -> Matrix {
        self.transposed_as(self.wtype)
    }

    /// The matrix transposed and stored as `wtype` (the neuron-major form of a down
    /// projection for the sparse operators). Panics if `wtype`'s blocks do not divide the
    /// new rows (`n_rows` values each).
    pub fn transposed_as(&self, wtype: WeightType) -> Matrix {
        let (r, c) = (self.n_rows, self.n_cols);
        let mut row = vec![0.0; c];
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            self.dequantize_row(i, &mut row);
            for (j, v) in row.iter().enumerate() {
                t[j * r + i] = *v;
            }
        }
        Matrix::quantize(wtype, &t, c, r)
    }
}

/// Number of activation formats (prepared buffers) an [`Activations`] keeps.
const N_SLOTS: usize = 7;

/// An f32 activation batch (`n_tok` rows of `n_cols`) and its prepared forms, made on
/// first use by a matrix of each format and kept until the next [`Activations::set`].
#[derive(Default)]
pub struct Activations {
    numerics: Numerics,
    x: Vec<f32>,
    n_tok: usize,
    n_cols: usize,
    ready: [bool; N_SLOTS],
    f32: (Vec<f32>, Vec<f32>),
    f16: (Vec<f16>, Vec<f16>),
    bf16: (Vec<bf16>, Vec<bf16>),
    nib_q8_0: (Vec<BlockQ8_0>, Vec<PrepNib>),
    nib_q8_1: (Vec<BlockQ8_1>, Vec<PrepNib>),
    q8: (Vec<BlockQ8_0>, Vec<PrepQ8>),
    q8k: (Vec<BlockQ8K>, Vec<BlockQ8K>),
}

/// Where a weight type's activation and prepared buffers live in [`Activations`]; types
/// sharing a prepared format share a slot.
pub(crate) trait ActSlot: WeightBlock {
    const SLOT: usize;
    fn buffers(a: &mut Activations) -> &mut (Vec<Self::Act>, Vec<Self::Prep>);
    fn prep_ref(a: &Activations) -> &[Self::Prep];
}

macro_rules! slot {
    ($($w:ty => $field:ident, $slot:expr;)*) => {$(
        impl ActSlot for $w {
            const SLOT: usize = $slot;
            fn buffers(a: &mut Activations) -> &mut (Vec<Self::Act>, Vec<Self::Prep>) {
                &mut a.$field
            }
            fn prep_ref(a: &Activations) -> &[Self::Prep] {
                &a.$field.1
            }
        }
    )*};
}
slot! {
    f32 => f32, 0;
    f16 => f16, 1;
    bf16 => bf16, 2;
    BlockQ4_0 => nib_q8_0, 3;
    BlockQ5_0 => nib_q8_0, 3;
    BlockQ4_1 => nib_q8_1, 4;
    BlockQ5_1 => nib_q8_1, 4;
    BlockQ8_0 => q8, 5;
    BlockIQ4NL => q8, 5;
    BlockQ4K => q8k, 6;
    BlockQ5K => q8k, 6;
    BlockQ6K => q8k, 6;
    BlockQ2K => q8k, 6;
    BlockQ3K => q8k, 6;
    BlockIQ4XS => q8k, 6;
}

impl Activations {
    /// Activations prepared in the engine's default (precise) numerics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Activations prepared in the given numerics.
    pub fn with_numerics(numerics: Numerics) -> Self {
        Self {
            numerics,
            ..Self::default()
        }
    }

    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// Replaces the batch with `x` (`n_tok` rows); prepared forms are made again on demand.
    pub fn set(&mut self, x: &[f32], n_tok: usize) {
        assert!(n_tok > 0 && x.len().is_multiple_of(n_tok));
        self.x.clear();
        self.x.extend_from_slice(x);
        self.n_tok = n_tok;
        self.n_cols = x.len() / n_tok;
        self.ready = [false; N_SLOTS];
    }

    pub fn x(&self) -> &[f32] {
        &self.x
    }

    pub fn n_tok(&self) -> usize {
        self.n_tok
    }

    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// Prepares the batch for weights of type `wtype` (a no-op when already prepared),
    /// for the operators that read it through [`Matrix::with_row_dots`].
    pub fn prepare_for(&mut self, wtype: WeightType) {
        with_block!(wtype, W => {
            self.prepared::<W>();
        })
    }

    fn prepared_ref<W: ActSlot>(&self) -> &[W::Prep] {
        assert!(
            self.ready[W::SLOT],
            "activations not prepared for {}",
            W::DTYPE
        );
        W::prep_ref(self)
    }

    /// The batch prepared for weights of type `W`: `n_tok` rows of `prep_len` units.
    fn prepared<W: ActSlot>(&mut self) -> &[W::Prep] {
        let (n_tok, n_cols) = (self.n_tok, self.n_cols);
        assert!(
            n_cols.is_multiple_of(W::LEN),
            "rows of {n_cols} are not whole {} blocks",
            W::DTYPE
        );
        if !self.ready[W::SLOT] {
            let bpr = n_cols / W::LEN;
            let stride = prep_len::<W>(bpr);
            let x = std::mem::take(&mut self.x);
            let numerics = self.numerics;
            let (act, prep) = W::buffers(self);
            // Every preparation writes its whole output: no need to clear first.
            prep.resize(n_tok * stride, W::Prep::default());
            for t in 0..n_tok {
                let xt = &x[t * n_cols..(t + 1) * n_cols];
                let pt = &mut prep[t * stride..(t + 1) * stride];
                match numerics {
                    Numerics::Precise => W::prepare_precise(xt, act, pt),
                    Numerics::Ggml => {
                        act.clear();
                        act.resize(n_cols / W::Act::LEN, W::Act::default());
                        W::Act::quantize(xt, act);
                        W::prepare_ggml(act, pt);
                    }
                }
            }
            self.x = x;
            self.ready[W::SLOT] = true;
        }
        &W::buffers(self).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn packed_matrices_compute_what_they_did() {
        let mut rng = Rng::new(5);
        let pool = ThreadPool::new(2, "test").unwrap();
        let n_cols = 256;
        // Row counts that leave odd byte lengths, and sizes on both sides of the
        // huge-page threshold once packed.
        let shapes = [
            (WeightType::Q4_1, 7),
            (WeightType::F16, 3),
            (WeightType::Q6_K, 5),
            (WeightType::Q8_0, 8000),
        ];
        let ms: Vec<Matrix> = shapes
            .iter()
            .map(|&(t, r)| Matrix::quantize(t, &rng.varied(r * n_cols, 32), r, n_cols))
            .collect();
        assert!(ms.iter().all(Matrix::owns_storage));
        let refs: Vec<&Matrix> = ms.iter().collect();
        let packed = Matrix::pack(&refs);
        assert!(packed.iter().map(Matrix::n_bytes).sum::<usize>() > crate::storage::HUGE_MIN);
        let x = rng.varied(2 * n_cols, 32);
        let mut acts = Activations::new();
        for (m, p) in ms.iter().zip(&packed) {
            assert!(!p.owns_storage(), "packed matrices share one buffer");
            assert_eq!(
                (p.wtype(), p.n_rows(), p.n_cols()),
                (m.wtype(), m.n_rows(), m.n_cols())
            );
            assert_eq!(p.bytes(), m.bytes());
            assert_eq!(p.bytes().as_ptr() as usize % crate::storage::HEAP_ALIGN, 0);
            let (mut a, mut b) = (vec![0.0; 2 * m.n_rows()], vec![0.0; 2 * m.n_rows()]);
            acts.set(&x, 2);
            m.matmul(&pool, &mut acts, &mut a);
            p.matmul(&pool, &mut acts, &mut b);
            assert_eq!(a, b);
        }
        assert!(Matrix::pack(&[]).is_empty());
    }

    #[test]
    fn matrices_of_every_type_share_prepared_activations_correctly() {
        let mut rng = Rng::new(3);
        let pool = ThreadPool::new(2, "test").unwrap();
        let (n_rows, n_cols, n_tok) = (24, 512, 3);
        // One magnitude throughout: Q8_K has a single scale per 256 values, so inputs whose
        // scale changes every 32 values would (correctly) lose their small blocks.
        let w: Vec<f32> = (0..n_rows * n_cols).map(|_| rng.normal()).collect();
        let x: Vec<f32> = (0..n_tok * n_cols).map(|_| rng.normal()).collect();
        let mut acts = Activations::new();
        acts.set(&x, n_tok);
        for wtype in WeightType::ALL {
            let m = Matrix::quantize(wtype, &w, n_rows, n_cols);
            let mut out = vec![0.0; n_rows * n_tok];
            m.matmul(&pool, &mut acts, &mut out);
            // Against dequantized weights in f64: within activation quantization error.
            let mut row = vec![0.0; n_cols];
            for r in 0..n_rows {
                m.dequantize_row(r, &mut row);
                for t in 0..n_tok {
                    let xt = &x[t * n_cols..(t + 1) * n_cols];
                    let exact: f64 = row
                        .iter()
                        .zip(xt)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let mag: f64 = row
                        .iter()
                        .zip(xt)
                        .map(|(a, b)| f64::from((a * b).abs()))
                        .sum();
                    let got = f64::from(out[t * n_rows + r]);
                    assert!(
                        (got - exact).abs() <= 0.02 * mag + 1e-6,
                        "{wtype:?} r={r} t={t}: {got} vs {exact}"
                    );
                }
            }
        }
        // Single-token batches take the matvec path and agree with the batched path.
        let m = Matrix::quantize(WeightType::Q4_1, &w, n_rows, n_cols);
        let mut batched = vec![0.0; n_rows * n_tok];
        m.matmul(&pool, &mut acts, &mut batched);
        for t in 0..n_tok {
            let mut one = Activations::new();
            one.set(&x[t * n_cols..(t + 1) * n_cols], 1);
            let mut out = vec![0.0; n_rows];
            m.matmul(&pool, &mut one, &mut out);
            assert_eq!(out, batched[t * n_rows..(t + 1) * n_rows]);
        }
    }
}
