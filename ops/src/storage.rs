//! Bytes that tensors live in: a read-only memory map of a model file, or an aligned heap
//! buffer (a file read into memory, or weights made at load), large ones in huge pages
//! where the system allows. Shared by `Arc` so tensors can borrow from it without copying.

use std::fs::File;
use std::io::Read;
use std::ops::Deref;
use std::path::Path;

use memmap2::{Mmap, MmapMut};

/// Heap buffers are aligned to a cache line, enough for every element type.
pub const HEAP_ALIGN: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; HEAP_ALIGN]);

/// Buffers at least this large are anonymous maps that ask for transparent huge pages.
pub const HUGE_MIN: usize = 2 << 20;

/// A heap byte buffer whose start is aligned to [`HEAP_ALIGN`]. Large ones (weights made
/// at load: transposed or gathered matrices) are anonymous maps advised to use huge
/// pages where the system allows it: scattered rows of a sparse operator then miss the
/// TLB far less often.
pub struct AlignedBytes {
    buf: Buf,
    len: usize,
}

enum Buf {
    Lines(Vec<Line>),
    Map(MmapMut),
}

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        if len >= HUGE_MIN
            && let Ok(map) = MmapMut::map_anon(len)
        {
            // A hint: without huge pages the map works the same.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            return Self {
                buf: Buf::Map(map),
                len,
            };
        }
        Self {
            buf: Buf::Lines(vec![Line([0; HEAP_ALIGN]); len.div_ceil(HEAP_ALIGN)]),
            len,
        }
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut out = Self::zeroed(bytes.len());
        out.as_mut_slice().copy_from_slice(bytes);
        out
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.buf {
            // SAFETY: `lines` holds at least `len` initialized bytes, contiguous because
            // `Line` is a plain byte array with no padding.
            Buf::Lines(l) => unsafe {
                std::slice::from_raw_parts(l.as_ptr().cast::<u8>(), self.len)
            },
            Buf::Map(m) => &m[..self.len],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.buf {
            // SAFETY: as `as_slice`, with unique access through `&mut self`.
            Buf::Lines(l) => unsafe {
                std::slice::from_raw_parts_mut(l.as_mut_ptr().cast::<u8>(), self.len)
            },
            Buf::Map(m) => &mut m[..self.len],
        }
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

impl Storage {
    /// Reads `path` into memory of its own: an [`AlignedBytes`], so a file of
    /// [`HUGE_MIN`] bytes or more lands in memory advised to use huge pages.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let mut file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("the file is larger than the address space"))?;
        let mut bytes = AlignedBytes::zeroed(len);
        file.read_exact(bytes.as_mut_slice())?;
        Ok(Self::Heap(bytes))
    }
}

/// Whether the system backs memory advised to use huge pages with them (Linux transparent
/// huge pages set to `always` or `madvise`).
pub fn huge_pages_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
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
