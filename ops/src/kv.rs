//! The key/value cache: for every sequence slot of a layer, each KV head's keys and values
//! at every position, contiguous per head so attention reads them in order.
//!
//! A [`LayerKv`] is one layer's cache; a [`KvCache`] holds the layers one side computes
//! (the host holds those whose attention is not on a device, a device its own).

use half::f16;

use crate::ids::SeqSlot;
use crate::nn::KvElem;

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

/// The dimensions of one layer's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_slots: usize,
    pub n_ctx: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub ty: KvType,
}

impl KvShape {
    /// Elements of keys (or of values), `None` on overflow.
    fn n_elems(&self) -> Option<usize> {
        self.n_slots
            .checked_mul(self.n_head_kv)?
            .checked_mul(self.n_ctx)?
            .checked_mul(self.head_dim)
    }

    /// Bytes of one layer's keys and values (saturating: a shape too large for memory
    /// reports `usize::MAX`).
    pub fn layer_bytes(&self) -> usize {
        self.n_elems()
            .and_then(|n| n.checked_mul(2 * self.ty.bytes()))
            .unwrap_or(usize::MAX)
    }
}

/// The cache could not be allocated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot allocate a KV cache of {bytes} bytes ({n_slots} sequences x {n_ctx} tokens)")]
pub struct KvAllocError {
    pub bytes: usize,
    pub n_slots: usize,
    pub n_ctx: usize,
}

enum KvData {
    F16 { k: Vec<f16>, v: Vec<f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

/// One head's cached keys and values at positions `0..n` (`n · head_dim` each).
pub enum KvHead<'a> {
    F16 { k: &'a [f16], v: &'a [f16] },
    F32 { k: &'a [f32], v: &'a [f32] },
}

fn try_filled<T: Clone>(n: usize, v: T) -> Option<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).ok()?;
    out.resize(n, v);
    Some(out)
}

/// One layer's cache, laid out `[slot][kv_head][pos][head_dim]`.
pub struct LayerKv {
    shape: KvShape,
    data: KvData,
}

impl LayerKv {
    /// A zeroed cache; one too large for memory is an error, not an abort.
    pub fn try_new(shape: KvShape) -> Result<Self, KvAllocError> {
        let err = || KvAllocError {
            bytes: shape.layer_bytes(),
            n_slots: shape.n_slots,
            n_ctx: shape.n_ctx,
        };
        let n = shape.n_elems().ok_or_else(err)?;
        let data = match shape.ty {
            KvType::F16 => KvData::F16 {
                k: try_filled(n, f16::ZERO).ok_or_else(err)?,
                v: try_filled(n, f16::ZERO).ok_or_else(err)?,
            },
            KvType::F32 => KvData::F32 {
                k: try_filled(n, 0.0).ok_or_else(err)?,
                v: try_filled(n, 0.0).ok_or_else(err)?,
            },
        };
        Ok(Self { shape, data })
    }

    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    /// Start of `(slot, head)`'s `[n_ctx][head_dim]` run.
    fn head_offset(&self, slot: SeqSlot, head: usize) -> usize {
        let s = &self.shape;
        debug_assert!(slot.0 < s.n_slots && head < s.n_head_kv);
        (slot.0 * s.n_head_kv + head) * s.n_ctx * s.head_dim
    }

    /// Stores the keys and values (`n_head_kv · head_dim` each) of one position.
    pub fn write(&mut self, slot: SeqSlot, pos: usize, k: &[f32], v: &[f32]) {
        let s = self.shape;
        assert!(
            pos < s.n_ctx && slot.0 < s.n_slots,
            "position {pos} of slot {} is outside the cache ({} slots of {})",
            slot.0,
            s.n_slots,
            s.n_ctx
        );
        let hd = s.head_dim;
        for h in 0..s.n_head_kv {
            let at = self.head_offset(slot, h) + pos * hd;
            let (ks, vs) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
            match &mut self.data {
                KvData::F16 { k, v } => {
                    store(&mut k[at..at + hd], ks);
                    store(&mut v[at..at + hd], vs);
                }
                KvData::F32 { k, v } => {
                    k[at..at + hd].copy_from_slice(ks);
                    v[at..at + hd].copy_from_slice(vs);
                }
            }
        }
    }

    /// KV head `head` of `slot` at positions `0..n_pos`.
    pub fn head(&self, slot: SeqSlot, head: usize, n_pos: usize) -> KvHead<'_> {
        self.head_range(slot, head, 0..n_pos)
    }

    /// KV head `head` of `slot` at positions `positions` (a sliding window's).
    pub fn head_range(
        &self,
        slot: SeqSlot,
        head: usize,
        positions: std::ops::Range<usize>,
    ) -> KvHead<'_> {
        assert!(positions.start <= positions.end && positions.end <= self.shape.n_ctx);
        let (base, hd) = (self.head_offset(slot, head), self.shape.head_dim);
        let span = base + positions.start * hd..base + positions.end * hd;
        match &self.data {
            KvData::F16 { k, v } => KvHead::F16 {
                k: &k[span.clone()],
                v: &v[span],
            },
            KvData::F32 { k, v } => KvHead::F32 {
                k: &k[span.clone()],
                v: &v[span],
            },
        }
    }
}

fn store<K: KvElem>(dst: &mut [K], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = K::from_f32(*s);
    }
}

/// The caches of a model's layers on one side: `None` for the layers another side holds.
pub struct KvCache {
    shape: KvShape,
    layers: Vec<Option<LayerKv>>,
}

impl KvCache {
    /// A cache for every layer `l` with `held(l)`, each of `shape`.
    pub fn try_for_layers(
        n_layer: usize,
        shape: KvShape,
        held: impl Fn(usize) -> bool,
    ) -> Result<Self, KvAllocError> {
        let layers = (0..n_layer)
            .map(|l| held(l).then(|| LayerKv::try_new(shape)).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Self { shape, layers })
    }

    /// Like [`Self::new`], but a cache too large for memory is an error, not an abort.
    pub fn try_new(
        n_layer: usize,
        n_slots: usize,
        n_ctx: usize,
        n_head_kv: usize,
        head_dim: usize,
        ty: KvType,
    ) -> Result<Self, KvAllocError> {
        let shape = KvShape {
            n_slots,
            n_ctx,
            n_head_kv,
            head_dim,
            ty,
        };
        Self::try_for_layers(n_layer, shape, |_| true).map_err(|e| KvAllocError {
            bytes: Self::bytes_for(n_layer, n_slots, n_ctx, n_head_kv, head_dim, ty),
            ..e
        })
    }

    /// A cache of every layer. Panics when memory is short (tests and tools; the daemon
    /// uses [`Self::try_new`]).
    pub fn new(
        n_layer: usize,
        n_slots: usize,
        n_ctx: usize,
        n_head_kv: usize,
        head_dim: usize,
        ty: KvType,
    ) -> Self {
        match Self::try_new(n_layer, n_slots, n_ctx, n_head_kv, head_dim, ty) {
            Ok(kv) => kv,
            Err(e) => panic!("{e}"),
        }
    }

    /// Bytes a cache of every layer of these dimensions takes.
    pub fn bytes_for(
        n_layer: usize,
        n_slots: usize,
        n_ctx: usize,
        n_head_kv: usize,
        head_dim: usize,
        ty: KvType,
    ) -> usize {
        let shape = KvShape {
            n_slots,
            n_ctx,
            n_head_kv,
            head_dim,
            ty,
        };
        shape.layer_bytes().saturating_mul(n_layer)
    }

    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    pub fn n_ctx(&self) -> usize {
        self.shape.n_ctx
    }

    pub fn n_slots(&self) -> usize {
        self.shape.n_slots
    }

    pub fn kv_type(&self) -> KvType {
        self.shape.ty
    }

    /// Layer `layer`'s cache, when this side holds it.
    pub fn layer(&self, layer: usize) -> Option<&LayerKv> {
        self.layers.get(layer)?.as_ref()
    }

    pub fn layer_mut(&mut self, layer: usize) -> Option<&mut LayerKv> {
        self.layers.get_mut(layer)?.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_in_their_slot_head_and_position() {
        let shape = KvShape {
            n_slots: 2,
            n_ctx: 4,
            n_head_kv: 2,
            head_dim: 3,
            ty: KvType::F32,
        };
        let mut kv = LayerKv::try_new(shape).unwrap();
        let k: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..6).map(|i| 10.0 + i as f32).collect();
        kv.write(SeqSlot(1), 2, &k, &v);
        let KvHead::F32 { k: k1, v: v1 } = kv.head(SeqSlot(1), 1, 3) else {
            panic!("f32 cache")
        };
        assert_eq!(&k1[6..9], &[3.0, 4.0, 5.0]);
        assert_eq!(&v1[6..9], &[13.0, 14.0, 15.0]);
        assert_eq!(&k1[..6], &[0.0; 6]);
        let KvHead::F32 { k: k0, .. } = kv.head(SeqSlot(0), 0, 4) else {
            panic!("f32 cache")
        };
        assert!(k0.iter().all(|&x| x == 0.0), "other slots untouched");
        assert_eq!(shape.layer_bytes(), 2 * 2 * 4 * 2 * 3 * 4);
    }

    #[test]
    fn a_cache_too_large_is_an_error() {
        let Err(e) = KvCache::try_new(2, 1 << 20, 1 << 20, 64, 128, KvType::F16) else {
            panic!("allocated an impossible cache")
        };
        assert_eq!(e.n_slots, 1 << 20);
        let held = KvCache::try_for_layers(
            3,
            KvShape {
                n_slots: 1,
                n_ctx: 2,
                n_head_kv: 1,
                head_dim: 2,
                ty: KvType::F16,
            },
            |l| l != 1,
        )
        .unwrap();
        assert!(held.layer(0).is_some() && held.layer(1).is_none() && held.layer(2).is_some());
    }
}
