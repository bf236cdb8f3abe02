//! Bytes that tensors live in: a read-only memory map of a model file, or an aligned heap
//! buffer. Shared by `Arc` so tensors can borrow from it without copying.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use memmap2::Mmap;

/// Heap buffers are aligned to a cache line, enough for every element type.
pub const HEAP_ALIGN: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; HEAP_ALIGN]);

/// A heap byte buffer whose start is aligned to [`HEAP_ALIGN`].
pub struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; HEAP_ALIGN]); len.div_ceil(HEAP_ALIGN)],
            len,
        }
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut out = Self::zeroed(bytes.len());
        out.as_mut_slice().copy_from_slice(bytes);
        out
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` initialized bytes, contiguous because `Line`
        // is a plain byte array with no padding.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, with unique access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Where tensor bytes live.
pub enum Storage {
    /// A read-only private map of a file.
    Mapped(Mmap),
    Heap(AlignedBytes),
}

impl Storage {
    /// Maps `path` read-only.
    pub fn map(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            // Mapping an empty file fails on some systems; an empty buffer reads the same.
            return Ok(Self::Heap(AlignedBytes::zeroed(0)));
        }
        // SAFETY: the map is read-only and private. As with every mmap-based loader
        // (llama.cpp included), a file truncated by another process while mapped would
        // fault; model files are treated as immutable while loaded.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self::Mapped(map))
    }
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Heap(h) => h.as_slice(),
        }
    }
}
