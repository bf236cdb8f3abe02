//! Compiles the kernel sources with the host C++ compiler into the CPU execution harness,
//! once per warp width (32: NVIDIA and RDNA; 64: CDNA).

fn main() {
    for f in [
        "harness/harness.h",
        "harness/harness.cpp",
        "kernels/compat.cuh",
        "kernels/quant.cuh",
        "kernels/kernels.cu",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    for warp in [32, 64] {
        cc::Build::new()
            .cpp(true)
            .file("harness/harness.cpp")
            .std("c++17")
            .opt_level(3)
            .define("PI_WARP", warp.to_string().as_str())
            .define("PI_ENTRY", format!("pi_harness_launch_w{warp}").as_str())
            // The fibers' context switches return like setjmp; the scheduler's locals
            // are saved with the full context, so the warning does not apply.
            .flag_if_supported("-Wno-clobbered")
            .warnings_into_errors(true)
            .compile(&format!("pi_harness_w{warp}"));
    }
}
