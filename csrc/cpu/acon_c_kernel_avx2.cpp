#include "isa.h"
#ifdef ACON_CPU_X86_VARIANTS
// PyTorch's AVX2 build of the kernels; only called when
// at::get_cpu_capability() reports AVX2. The target pragma comes before every
// include; g++ does not define the ISA macros for it (gcc does), and headers
// such as sleef.h test them, so they are defined here to match.
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "acon_c_kernel_impl.h"
#endif
