// The ISA macros that g++ would define for `-mavx2 -mfma -mf16c`. Under
// `#pragma GCC target` g++ (unlike gcc) does not define them, and headers such
// as sleef.h test them. Included by the AVX2 and AVX-512 kernel files only,
// after their target pragma and before any other include.
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
