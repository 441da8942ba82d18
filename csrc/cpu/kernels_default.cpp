// Portable copy of the CPU kernels (ATen's generic Vectorized<T>).
#define CPU_CAPABILITY DEFAULT
#include "kernels_entry.h"
