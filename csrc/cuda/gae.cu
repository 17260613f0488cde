// GAE on CUDA, torch-free: one warp per row, walking the row backwards in chunks of 32 positions.
// Lane i of a chunk holds time t = T-1-start-i, so both recursions of the mask-aware GAE
// (see rlhf_fast/ops/gae.py) become forward warp scans over lanes (shuffles, no shared memory):
//   V_next(t): value at the next valid position (an exclusive "last valid" scan, carried across chunks)
//   A_t = d_t + c_t * A_{t+1} with (c, d) = (gamma*lam, delta_t) if valid else (1, 0): an affine scan.
// Each input is read once and each output written once, coalesced.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

__global__ void gae_kernel(const float* __restrict__ r, const float* __restrict__ v, const bool* __restrict__ m,
                           float* __restrict__ adv, float* __restrict__ ret, int64_t B, int64_t T, float gamma,
                           float gamma_lam) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= B) return;  // whole warps exit together
  const int64_t o = row * T;
  float carry_a = 0.f;   // advantage at the next valid position after this chunk
  float carry_vn = 0.f;  // value at the next valid position after this chunk
  for (int64_t start = 0; start < T; start += 32) {
    const int64_t t = T - 1 - start - lane;
    const bool valid = t >= 0 && m[o + t];
    const float vt = valid ? v[o + t] : 0.f;
    const float rt = valid ? r[o + t] : 0.f;
    // inclusive "last valid value" scan over lanes 0..lane, then the carry for lanes with none
    bool f = valid;
    float lv = vt;
    for (int off = 1; off < 32; off <<= 1) {
      const bool f_prev = __shfl_up_sync(kFull, f, off);
      const float lv_prev = __shfl_up_sync(kFull, lv, off);
      if (lane >= off) {
        if (!f) lv = lv_prev;
        f = f || f_prev;
      }
    }
    const float inc = f ? lv : carry_vn;
    const float prev = __shfl_up_sync(kFull, inc, 1);
    const float v_next = lane == 0 ? carry_vn : prev;  // exclusive: strictly later positions
    // affine scan: compose the maps of lanes 0..lane, then apply to the carry
    float c = valid ? gamma_lam : 1.f;
    float d = valid ? rt + gamma * v_next - vt : 0.f;
    for (int off = 1; off < 32; off <<= 1) {
      const float c_prev = __shfl_up_sync(kFull, c, off);
      const float d_prev = __shfl_up_sync(kFull, d, off);
      if (lane >= off) {
        d += c * d_prev;
        c *= c_prev;
      }
    }
    const float a = d + c * carry_a;
    if (t >= 0) {
      adv[o + t] = valid ? a : 0.f;
      ret[o + t] = valid ? a + vt : 0.f;
    }
    carry_a = __shfl_sync(kFull, a, 31);
    carry_vn = __shfl_sync(kFull, inc, 31);
  }
}

}  // namespace

void gae_cuda_launch(const float* r, const float* v, const bool* m, float* adv, float* ret, int64_t B, int64_t T,
                     float gamma, float lam, cudaStream_t s) {
  if (B == 0 || T == 0) return;
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gae_kernel<<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, s>>>(r, v, m, adv, ret, B, T, gamma,
                                                                          gamma * lam);
}
