// Compiled against the installed HIP headers when the crate's `hip` feature is on.
//
// 1. Every HIP and hiprtc function src/hip.rs declares, with the signature it declares
//    (error codes as int, handles as void*), and every constant it uses: a HIP whose
//    headers say otherwise fails the build here, not at run time.
// 2. The device's architecture name, read from hipDeviceProp_t by this compiler, which
//    knows the installed layout (the structure changed between releases; ROCm 6 renamed
//    hipGetDeviceProperties to a versioned symbol behind a macro).
#include <hip/hip_runtime_api.h>
#include <hip/hiprtc.h>

#include <cstddef>
#include <cstring>
#include <type_traits>

// A pointer of exactly `type` to `fn`: fails to compile unless the header declares `fn`
// (or, where it is overloaded, one of its overloads) with that signature.
#define PI_SAME(fn, type)  \
  using pi_type_##fn = type; \
  [[maybe_unused]] static constexpr pi_type_##fn pi_check_##fn = &fn

static_assert(sizeof(hipError_t) == sizeof(int), "hipError_t is an int");
static_assert(sizeof(hiprtcResult) == sizeof(int), "hiprtcResult is an int");
static_assert(sizeof(hipDevice_t) == sizeof(int), "hipDevice_t is an int");
static_assert(sizeof(hipDeviceAttribute_t) == sizeof(int), "hipDeviceAttribute_t is an int");
static_assert(std::is_pointer<hipStream_t>::value && std::is_pointer<hipEvent_t>::value &&
                  std::is_pointer<hipModule_t>::value && std::is_pointer<hipFunction_t>::value &&
                  std::is_pointer<hiprtcProgram>::value && std::is_pointer<hipDeviceptr_t>::value,
              "handles are pointers");

PI_SAME(hipInit, hipError_t (*)(unsigned int));
PI_SAME(hipGetDeviceCount, hipError_t (*)(int*));
PI_SAME(hipSetDevice, hipError_t (*)(int));
PI_SAME(hipDeviceGetName, hipError_t (*)(char*, int, hipDevice_t));
PI_SAME(hipDeviceGetAttribute, hipError_t (*)(int*, hipDeviceAttribute_t, int));
PI_SAME(hipRuntimeGetVersion, hipError_t (*)(int*));
PI_SAME(hipGetErrorName, const char* (*)(hipError_t));
PI_SAME(hipGetErrorString, const char* (*)(hipError_t));
PI_SAME(hipMemGetInfo, hipError_t (*)(size_t*, size_t*));
PI_SAME(hipMalloc, hipError_t (*)(void**, size_t));
PI_SAME(hipFree, hipError_t (*)(void*));
PI_SAME(hipHostMalloc, hipError_t (*)(void**, size_t, unsigned int));
PI_SAME(hipHostFree, hipError_t (*)(void*));
PI_SAME(hipMemcpyHtoDAsync, hipError_t (*)(hipDeviceptr_t, void*, size_t, hipStream_t));
PI_SAME(hipMemcpyDtoHAsync, hipError_t (*)(void*, hipDeviceptr_t, size_t, hipStream_t));
PI_SAME(hipMemsetD8Async, hipError_t (*)(hipDeviceptr_t, unsigned char, size_t, hipStream_t));
PI_SAME(hipStreamCreateWithFlags, hipError_t (*)(hipStream_t*, unsigned int));
PI_SAME(hipStreamSynchronize, hipError_t (*)(hipStream_t));
PI_SAME(hipStreamDestroy, hipError_t (*)(hipStream_t));
PI_SAME(hipEventCreateWithFlags, hipError_t (*)(hipEvent_t*, unsigned int));
PI_SAME(hipEventRecord, hipError_t (*)(hipEvent_t, hipStream_t));
PI_SAME(hipEventSynchronize, hipError_t (*)(hipEvent_t));
PI_SAME(hipEventDestroy, hipError_t (*)(hipEvent_t));
PI_SAME(hipModuleLoadData, hipError_t (*)(hipModule_t*, const void*));
PI_SAME(hipModuleGetFunction, hipError_t (*)(hipFunction_t*, hipModule_t, const char*));
PI_SAME(hipModuleUnload, hipError_t (*)(hipModule_t));
PI_SAME(hipModuleLaunchKernel,
        hipError_t (*)(hipFunction_t, unsigned int, unsigned int, unsigned int, unsigned int,
                       unsigned int, unsigned int, unsigned int, hipStream_t, void**, void**));
PI_SAME(hiprtcVersion, hiprtcResult (*)(int*, int*));
PI_SAME(hiprtcCreateProgram, hiprtcResult (*)(hiprtcProgram*, const char*, const char*, int,
                                              const char**, const char**));
PI_SAME(hiprtcCompileProgram, hiprtcResult (*)(hiprtcProgram, int, const char**));
PI_SAME(hiprtcGetProgramLogSize, hiprtcResult (*)(hiprtcProgram, size_t*));
PI_SAME(hiprtcGetProgramLog, hiprtcResult (*)(hiprtcProgram, char*));
PI_SAME(hiprtcGetCodeSize, hiprtcResult (*)(hiprtcProgram, size_t*));
PI_SAME(hiprtcGetCode, hiprtcResult (*)(hiprtcProgram, char*));
PI_SAME(hiprtcDestroyProgram, hiprtcResult (*)(hiprtcProgram*));
PI_SAME(hiprtcGetErrorString, const char* (*)(hiprtcResult));

// The values src/hip.rs uses (module `consts` there).
static_assert(hipSuccess == 0, "hipSuccess");
static_assert(hipErrorOutOfMemory == 2, "hipErrorOutOfMemory");
static_assert(hipErrorNoDevice == 100, "hipErrorNoDevice");
static_assert(hipErrorInvalidDevice == 101, "hipErrorInvalidDevice");
static_assert(hipErrorInsufficientDriver == 35, "hipErrorInsufficientDriver");
static_assert(hipErrorNoBinaryForGpu == 209, "hipErrorNoBinaryForGpu");
static_assert(hipDeviceAttributeWarpSize == 87, "hipDeviceAttributeWarpSize");
static_assert(hipStreamNonBlocking == 1, "hipStreamNonBlocking");
static_assert(hipEventDisableTiming == 2, "hipEventDisableTiming");
static_assert(hipHostMallocDefault == 0, "hipHostMallocDefault");
static_assert(HIPRTC_SUCCESS == 0, "HIPRTC_SUCCESS");

// The markers of hipModuleLaunchKernel's `extra` list, as this header defines them.
extern "C" void* const pi_hip_launch_params[3] = {
    HIP_LAUNCH_PARAM_BUFFER_POINTER, HIP_LAUNCH_PARAM_BUFFER_SIZE, HIP_LAUNCH_PARAM_END};

// The architecture name of `device` ("gfx90a:sramecc+:xnack-"), NUL-terminated in `out`.
extern "C" int pi_hip_arch_name(int device, char* out, size_t cap) {
  if (cap == 0) return (int)hipErrorInvalidValue;
  hipDeviceProp_t p;
  std::memset(&p, 0, sizeof p);
  hipError_t e = hipGetDeviceProperties(&p, device);
  if (e != hipSuccess) return (int)e;
  std::strncpy(out, p.gcnArchName, cap - 1);
  out[cap - 1] = '\0';
  return 0;
}
