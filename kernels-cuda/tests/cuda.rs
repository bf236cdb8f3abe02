//! The CUDA backend without a GPU: NVRTC compiles every kernel for each architecture the
//! project targets, and a machine without a driver, NVRTC or device gets a typed error.
//! Set `PI_REQUIRE_NVRTC=1` (CI does) to make a missing NVRTC a failure, not a skip.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use powerinfer_kernels_cuda::KERNEL_NAMES;
use powerinfer_kernels_cuda::cuda::{CudaBackend, CudaError, compile_ptx, nvrtc_version};

/// Ampere (A100, RTX 30), Ampere consumer, Ada (RTX 40, L4), Hopper (H100, H200).
const ARCHS: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90"];

fn nvrtc_required() -> bool {
    std::env::var("PI_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

#[test]
fn nvrtc_compiles_every_kernel_for_each_architecture() {
    match nvrtc_version() {
        Ok((major, minor)) => eprintln!("NVRTC {major}.{minor}"),
        Err(CudaError::NoNvrtc) if !nvrtc_required() => {
            eprintln!("SKIPPED: no libnvrtc on this machine (PI_REQUIRE_NVRTC=1 makes this fail)");
            return;
        }
        Err(e) => panic!("{e}"),
    }
    for arch in ARCHS {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        let digits = arch.trim_start_matches("sm_");
        assert!(
            ptx.contains(&format!(".target sm_{digits}")),
            "{arch}: PTX for the wrong target"
        );
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: {name} is missing from the PTX"
            );
        }
        assert_eq!(ptx.matches(".entry ").count(), KERNEL_NAMES.len(), "{arch}");
    }
}

#[test]
fn a_broken_architecture_is_a_compile_error_with_the_log() {
    if nvrtc_version().is_err() {
        eprintln!("SKIPPED: no libnvrtc on this machine");
        assert!(!nvrtc_required());
        return;
    }
    match compile_ptx("sm_10") {
        Err(CudaError::Compile { arch, log }) => {
            assert_eq!(arch, "sm_10");
            assert!(!log.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn opening_a_device_is_a_typed_error_without_one() {
    let count = match CudaBackend::device_count() {
        Err(CudaError::NoDriver) => {
            eprintln!("no CUDA driver on this machine: opening says so");
            assert_eq!(CudaBackend::open(0, None).err(), Some(CudaError::NoDriver));
            return;
        }
        Err(e) => panic!("{e}"),
        Ok(n) => n,
    };
    let e = CudaBackend::open(count, None).err().unwrap();
    if count == 0 {
        assert_eq!(e, CudaError::NoDevice);
    } else {
        assert_eq!(
            e,
            CudaError::NoSuchDevice {
                ordinal: count,
                count
            }
        );
    }
}
