// fate's kernels for avx512vnni (see isa_body.h).
#include <immintrin.h>

#include "isa.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define FATE_NS fate_avx512vnni
#define FATE_DOT 2
#include "isa_body.h"
