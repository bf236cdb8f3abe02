//! With the `hip` feature: compiles `shim/hip_shim.cpp` against the installed HIP headers
//! (its static assertions fail the build when a function this crate declares has another
//! signature there, or a constant another value), and links hiprtc where ROCm ships it
//! as a library of its own (6.0 and newer; 5.x has it inside libamdhip64).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/hip_shim.cpp");
    println!("cargo:rerun-if-env-changed=HIP_PATH");
    println!("cargo:rerun-if-env-changed=ROCM_PATH");
    if std::env::var_os("CARGO_FEATURE_HIP").is_none() {
        return;
    }
    let root = hip_root().unwrap_or_else(|| {
        panic!(
            "the hip feature needs ROCm's HIP headers (include/hip/hip_runtime_api.h under \
             $HIP_PATH, $ROCM_PATH, /opt/rocm or /usr): install ROCm, or Debian's \
             libamdhip64-dev"
        )
    });
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("shim/hip_shim.cpp")
        .include(root.join("include"))
        .define("__HIP_PLATFORM_AMD__", None)
        .warnings_into_errors(true)
        .compile("pi_hip_shim");
    for lib in [root.join("lib"), root.join("lib/x86_64-linux-gnu")] {
        if lib.join("libhiprtc.so").exists() {
            println!("cargo:rustc-link-search=native={}", lib.display());
            println!("cargo:rustc-link-lib=dylib=hiprtc");
            break;
        }
    }
}

fn hip_root() -> Option<PathBuf> {
    ["HIP_PATH", "ROCM_PATH"]
        .iter()
        .filter_map(|k| std::env::var_os(k).map(PathBuf::from))
        .chain(["/opt/rocm", "/usr"].map(PathBuf::from))
        .find(|p| p.join("include/hip/hip_runtime_api.h").exists())
}
