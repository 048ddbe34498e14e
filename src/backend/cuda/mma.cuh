/* Tensor-core and async-copy primitives shared by the attention kernels: mma.sync m16n8k16 (bf16
 * in, float32 accumulators), ldmatrix, cp.async, bf16 packing.
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16 bf16): with r = lane / 4 and c = 2 * (lane % 4), the
 * A operand holds rows r and r + 8, columns c, c+1 and c+8, c+9; B holds rows (k) c, c+1 and
 * c+8, c+9 of column (n) r; the accumulator holds rows r and r + 8, columns c and c+1. */
#ifndef TESSERA_CUDA_MMA_CUH
#define TESSERA_CUDA_MMA_CUH

#include "cuda_common.cuh"

__device__ __forceinline__ uint32_t mma_pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

/* d += a (16x16, row) * b (16x8, col) */
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_ldmatrix_x4_trans(uint32_t &r0, uint32_t &r1, uint32_t &r2,
                                                      uint32_t &r3, const void *p) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a)
               : "memory");
}

/* 16 bytes global -> shared without registers; valid == false writes zeros. */
__device__ __forceinline__ void mma_cp_async16(void *dst, const void *src, bool valid) {
  unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n)
               : "memory");
}
__device__ __forceinline__ void mma_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void mma_cp_async_wait1() {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}
__device__ __forceinline__ void mma_cp_async_wait0() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

#endif
