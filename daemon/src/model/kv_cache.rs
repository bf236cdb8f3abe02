//! The key/value cache: for every layer and sequence slot, each KV head's keys and values
//! at every position, contiguous per head so attention reads them in order.

use half::f16;

use crate::ids::SeqSlot;

/// Element type of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

pub(crate) enum KvData {
    F16 { k: Vec<f16>, v: Vec<f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

/// Layout `[layer][slot][kv_head][pos][head_dim]`.
pub struct KvCache {
    n_layer: usize,
    n_slots: usize,
    n_ctx: usize,
    n_head_kv: usize,
    head_dim: usize,
    pub(crate) data: KvData,
}

/// The cache could not be allocated.
#[derive(Debug, thiserror::Error)]
#[error("cannot allocate a KV cache of {bytes} bytes ({n_slots} sequences x {n_ctx} tokens)")]
pub struct KvAllocError {
    pub bytes: usize,
    pub n_slots: usize,
    pub n_ctx: usize,
}

fn try_filled<T: Clone>(n: usize, v: T) -> Option<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).ok()?;
    out.resize(n, v);
    Some(out)
}

impl KvCache {
    /// Like [`Self::new`], but a cache too large for memory is an error, not an abort.
    pub fn try_new(
        n_layer: usize,
        n_slots: usize,
        n_ctx: usize,
        n_head_kv: usize,
        head_dim: usize,
        ty: KvType,
    ) -> Result<Self, KvAllocError> {
        let err = || KvAllocError {
            bytes: Self::bytes_for(n_layer, n_slots, n_ctx, n_head_kv, head_dim, ty),
            n_slots,
            n_ctx,
        };
        let n = n_layer
            .checked_mul(n_slots)
            .and_then(|v| v.checked_mul(n_head_kv))
            .and_then(|v| v.checked_mul(n_ctx))
            .and_then(|v| v.checked_mul(head_dim))
            .ok_or_else(err)?;
        let data = match ty {
            KvType::F16 => KvData::F16 {
                k: try_filled(n, f16::ZERO).ok_or_else(err)?,
                v: try_filled(n, f16::ZERO).ok_or_else(err)?,
            },
            KvType::F32 => KvData::F32 {
                k: try_filled(n, 0.0).ok_or_else(err)?,
                v: try_filled(n, 0.0).ok_or_else(err)?,
            },
        };
        Ok(Self {
            n_layer,
            n_slots,
            n_ctx,
            n_head_kv,
            head_dim,
            data,
        })
    }

    pub fn new(
        n_layer: usize,
        n_slots: usize,
        n_ctx: usize,
        n_head_kv: usize,
        head_dim: usize,
        ty: KvType,
    ) -> Self {
        let n = n_layer * n_slots * n_head_kv * n_ctx * head_dim;
        let data = match ty {
            KvType::F16 => KvData::F16 {
                k: vec![f16::ZERO; n],
                v: vec![f16::ZERO; n],
            },
            KvType::F32 => KvData::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
        };
        Self {
            n_layer,
            n_slots,
            n_ctx,
            n_head_kv,
            head_dim,
            data,
        }
    }

    /// Bytes a cache of these dimensions takes.
    pub fn bytes_for(
        n_layer: usize,
        n_slots: usize,
        n_ctx: usize,
        n_head_kv: usize,
        head_dim: usize,
        ty: KvType,
    ) -> usize {
        2 * n_layer * n_slots * n_head_kv * n_ctx * head_dim * ty.bytes()
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    pub fn kv_type(&self) -> KvType {
        match self.data {
            KvData::F16 { .. } => KvType::F16,
            KvData::F32 { .. } => KvType::F32,
        }
    }

    /// Start of `(layer, slot, head)`'s `[n_ctx][head_dim]` run.
    pub(crate) fn head_offset(&self, layer: usize, slot: SeqSlot, head: usize) -> usize {
        debug_assert!(layer < self.n_layer && slot.0 < self.n_slots && head < self.n_head_kv);
        ((layer * self.n_slots + slot.0) * self.n_head_kv + head) * self.n_ctx * self.head_dim
    }

    /// Stores the keys and values (`n_head_kv · head_dim` each) of one position.
    pub fn write(&mut self, layer: usize, slot: SeqSlot, pos: usize, k: &[f32], v: &[f32]) {
        assert!(
            pos < self.n_ctx,
            "position {pos} is past the cache size {}",
            self.n_ctx
        );
        let hd = self.head_dim;
        for h in 0..self.n_head_kv {
            let at = self.head_offset(layer, slot, h) + pos * hd;
            let (ks, vs) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
            match &mut self.data {
                KvData::F16 { k, v } => {
                    for (d, s) in k[at..at + hd].iter_mut().zip(ks) {
                        *d = f16::from_f32(*s);
                    }
                    for (d, s) in v[at..at + hd].iter_mut().zip(vs) {
                        *d = f16::from_f32(*s);
                    }
                }
                KvData::F32 { k, v } => {
                    k[at..at + hd].copy_from_slice(ks);
                    v[at..at + hd].copy_from_slice(vs);
                }
            }
        }
    }
}
