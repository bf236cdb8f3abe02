//! Runtime CPU feature levels and the dispatch of dot-product kernels.
//!
//! Kernels are compiled for every level and chosen at run time: `Scalar` (the reference
//! twins), `Avx2` (AVX2 + FMA + F16C), `Avx512` (F/BW/VL/DQ: float kernels at 512 bits,
//! integer kernels from AVX2) and `Avx512Vnni` (adds VNNI `vpdpbusd` integer kernels).

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;

use std::sync::OnceLock;

/// A set of SIMD instructions kernels may use; ordered from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    Scalar,
    Avx2,
    Avx512,
    Avx512Vnni,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 4] = [Self::Scalar, Self::Avx2, Self::Avx512, Self::Avx512Vnni];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == s)
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        self <= hardware_level()
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn probe() -> SimdLevel {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma") && has!("f16c");
    let avx512 =
        avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq");
    match (avx2, avx512, avx512 && has!("avx512vnni")) {
        (_, _, true) => SimdLevel::Avx512Vnni,
        (_, true, false) => SimdLevel::Avx512,
        (true, false, false) => SimdLevel::Avx2,
        _ => SimdLevel::Scalar,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn probe() -> SimdLevel {
    SimdLevel::Scalar
}

/// The highest level the CPU supports.
pub fn hardware_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(probe)
}

/// The cap [`limit`] set, if any.
static LIMIT: OnceLock<SimdLevel> = OnceLock::new();

/// Caps the level kernels run at for the rest of the process (for comparisons: the
/// binary's `POWERINFER_SIMD` setting). Call before the first kernel runs; a later call
/// is refused (the level a kernel ran at must not change under it).
pub fn limit(cap: SimdLevel) -> Result<(), SimdLevel> {
    LIMIT.set(cap)?;
    Ok(())
}

/// The level kernels run at: the hardware level, capped by [`limit`].
pub fn detected() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let hw = hardware_level();
        LIMIT.get().map_or(hw, |&cap| cap.min(hw))
    })
}

/// Every level this CPU supports, lowest first (what the twin tests iterate over).
pub fn supported_levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .collect()
}

/// Picks a kernel by level. `int` kernels have VNNI versions at `Avx512Vnni` and AVX2
/// versions below it; `float` kernels have 512-bit versions from `Avx512`. The requested
/// level is capped by the hardware, so a kernel is never handed out that cannot run.
macro_rules! dispatch {
    ($level:expr, int $name:ident $(::<$t:ty>)?, $fallback:expr) => {{
        let level = $level.min($crate::simd::hardware_level());
        #[cfg(target_arch = "x86_64")]
        match level {
            $crate::simd::SimdLevel::Avx512Vnni => return $crate::simd::avx512::$name $(::<$t>)?,
            $crate::simd::SimdLevel::Avx2 | $crate::simd::SimdLevel::Avx512 => {
                return $crate::simd::avx2::$name $(::<$t>)?;
            }
            $crate::simd::SimdLevel::Scalar => {}
        }
        let _ = level;
        $fallback
    }};
    ($level:expr, float $name:ident, $fallback:expr) => {{
        let level = $level.min($crate::simd::hardware_level());
        #[cfg(target_arch = "x86_64")]
        match level {
            $crate::simd::SimdLevel::Avx512 | $crate::simd::SimdLevel::Avx512Vnni => {
                return $crate::simd::avx512::$name;
            }
            $crate::simd::SimdLevel::Avx2 => return $crate::simd::avx2::$name,
            $crate::simd::SimdLevel::Scalar => {}
        }
        let _ = level;
        $fallback
    }};
}
pub(crate) use dispatch;

/// Picks a many-row kernel: the AVX-512 VNNI `$name` (contiguous rows) and `$at`
/// (scattered rows) at that level, otherwise the one-row kernel `$dot` in a loop.
macro_rules! dispatch_rows {
    ($level:expr, $name:ident, $at:ident $(::<$t:ty>)?, $dot:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if $level.min($crate::simd::hardware_level()) == $crate::simd::SimdLevel::Avx512Vnni {
            return $crate::quant::RowKernel::Rows(
                $crate::simd::avx512::$name $(::<$t>)?,
                $crate::simd::avx512::$at $(::<$t>)?,
            );
        }
        $crate::quant::RowKernel::Dot($dot)
    }};
}
pub(crate) use dispatch_rows;

/// Asks the CPU to start loading `data` into its L2 cache (a hint: no effect on results, a
/// no-op elsewhere than x86-64). Scattered rows of a sparse operator are not sequential
/// enough for the hardware prefetchers to follow, so each asks for the next ones itself.
/// Into L2 rather than L1: the L1 tracks few misses at a time, and the rows are read a
/// few hundred nanoseconds later. `cargo bench -p powerinfer-ops --bench sparse_min -- 7b
/// 50`: 0.63x the dense FFN's time, against 1.17x with `_MM_HINT_T0` here and
/// `PREFETCH_AHEAD` (tensor.rs) at 4.
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(data);
        let p = data.as_ptr().cast::<i8>();
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults; the address is inside `data` anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.add(off));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
