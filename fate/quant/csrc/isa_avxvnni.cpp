// fate's kernels for avxvnni (see isa_body.h).
#include <immintrin.h>

#include "isa.h"

#pragma GCC target("avx2,fma,f16c,avxvnni")
#define FATE_NS fate_avxvnni
#define FATE_DOT 1
#include "isa_body.h"
