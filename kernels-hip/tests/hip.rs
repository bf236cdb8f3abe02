//! The HIP backend without an AMD GPU: hiprtc compiles every kernel — the CUDA crate's
//! sources, in the HIP configuration — for CDNA2 (gfx90a, wave 64) and RDNA2 (gfx1030,
//! wave 32), and opening a device on a machine without one is a typed error. With a GPU,
//! the kernel device's op sequences run on it against the simulated device.
#![cfg(feature = "hip")]
#![allow(clippy::unwrap_used)]

use powerinfer_kernels_cuda::KERNEL_NAMES;
use powerinfer_kernels_hip::CHECKED_TARGETS;
use powerinfer_kernels_hip::hip::{
    HipBackend, HipError, compile_code_object, compile_source, hiprtc_version, runtime_version,
};

/// The CUDA crate's device tests (their harness cases run here too, on the same code).
#[path = "../../kernels-cuda/tests/device.rs"]
#[allow(unexpected_cfgs)] // its CUDA test is the CUDA crate's feature, not one of ours
mod device_cases;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn hiprtc_compiles_every_kernel_for_cdna2_and_rdna2() {
    let (major, minor) = hiprtc_version().unwrap();
    eprintln!(
        "hiprtc {major}.{minor}, HIP runtime {}",
        runtime_version().unwrap()
    );
    for (arch, wave) in CHECKED_TARGETS {
        let code = compile_code_object(arch, wave).unwrap_or_else(|e| panic!("{e}"));
        assert!(code.len() > 1024, "{arch}: {} bytes", code.len());
        assert!(contains(&code, arch.as_bytes()), "{arch}: not its target");
        for name in KERNEL_NAMES {
            // Each kernel's descriptor symbol, `name.kd`.
            assert!(
                contains(&code, format!("{name}.kd").as_bytes()),
                "{arch}: {name} is missing from the code object"
            );
        }
        eprintln!("{arch} (wave {wave}): {} bytes", code.len());
    }
}

#[test]
fn a_source_the_compiler_rejects_is_an_error_with_the_log() {
    let broken =
        powerinfer_kernels_cuda::kernel_source(64) + "\nPI_GLOBAL void pi_broken() { oops; }\n";
    match compile_source(&broken, "gfx90a", 64) {
        Err(HipError::Compile { arch, log }) => {
            assert_eq!(arch, "gfx90a");
            assert!(log.contains("oops"), "{log}");
        }
        other => panic!("{:?}", other.map(|c| c.len())),
    }
}

#[test]
fn opening_a_device_is_a_typed_error_without_one() {
    let count = HipBackend::device_count().unwrap();
    let e = HipBackend::open(count, None).err().unwrap();
    if count == 0 {
        eprintln!("no HIP device on this machine: opening says so");
        assert_eq!(e, HipError::NoDevice);
        assert_eq!(
            e.to_string(),
            "no HIP device (no AMD GPU, or its kernel driver is not loaded)"
        );
    } else {
        assert_eq!(
            e,
            HipError::NoSuchDevice {
                ordinal: count,
                count
            }
        );
    }
}

/// The CUDA crate's op sequences on a HIP device, when the machine has one.
#[test]
fn every_case_on_a_hip_device() {
    use powerinfer_kernels_cuda::Backend;
    for (c, seed) in [
        device_cases::q4_1_case(),
        device_cases::k_quant_case(),
        device_cases::float_case(),
    ] {
        let b = match HipBackend::open(0, None) {
            Ok(b) => b,
            Err(HipError::NoDevice) => {
                eprintln!("SKIPPED: no HIP device: the HIP device test needs an AMD GPU");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        eprintln!("{}", b.name());
        device_cases::check_on(&c, seed, b);
    }
}
