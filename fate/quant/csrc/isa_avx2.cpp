// fate's kernels for avx2 (see isa_body.h).
#include <immintrin.h>

#include "isa.h"

#pragma GCC target("avx2,fma,f16c")
#define FATE_NS fate_avx2
#define FATE_DOT 0
#include "isa_body.h"
