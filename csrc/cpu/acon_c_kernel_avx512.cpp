#include "isa.h"
#ifdef ACON_CPU_X86_VARIANTS
// PyTorch's AVX-512 build of the kernels; only called when
// at::get_cpu_capability() reports AVX512. The target comes before every
// include; see isa_macros_avx2.h for why the ISA macros are defined by hand.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "isa_macros_avx2.h"
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "acon_c_kernel_impl.h"
#endif
