#include "isa.h"
#ifdef ACON_CPU_X86_VARIANTS
// PyTorch's AVX2 build of the kernels; only called when
// at::get_cpu_capability() reports AVX2. The target comes before every include.
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "isa_macros_avx2.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "acon_c_kernel_impl.h"
#endif
