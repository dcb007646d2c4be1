// Whether the AVX2 / AVX-512 builds of the CPU kernels exist. They are made
// with `#pragma GCC target` placed before any include, so they need no special
// compiler flags; other compilers and CPUs get the DEFAULT build only.
// Kept free of includes so the kernel files can read it before the pragma.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACON_CPU_X86_VARIANTS 1
#endif
