#include "isa.h"
#ifdef ACON_CPU_X86_VARIANTS
// PyTorch's AVX-512 build of the kernels; only called when
// at::get_cpu_capability() reports AVX512. The target pragma comes before every
// include; g++ does not define the ISA macros for it (gcc does), and headers
// such as sleef.h test them, so they are defined here to match.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "acon_c_kernel_impl.h"
#endif
