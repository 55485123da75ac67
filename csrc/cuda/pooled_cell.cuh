// What the pooled cells' CUDA kernels share: the fused SepConv kernels, among them the fused
// forward step of a, b, c, d (SepconvCellStep), the cell backward, and the weight gradients of
// the attention features F of b, c, d.
//
// shared/SPEC.md (a)–(d): per sample b, channel c and pixel p
//   G = tanh(cand_preact[b, p, c])       (cand_preact: both candidate SepConvs + b_c)
//   gates σ(gate_pre[b, ·]) are per (b, c); for c/d one gate is the attention map
//   A[b, p, c] = exp(Z[b, p, c] − max_p Z[b, p, c])    (input gate for c, output gate for d)
//   C_t = f∘C_{t−1} + i∘G,  H_t = o∘tanh(C_t)
// and the forward also sums H_t over the pixels (the next step's GAP(H_t)).
// Gate order in gate_pre (cells.h Cell::gates): (i, f, o) for a and b, (f, o) for c, (i, f) for
// d; `map_gate` (cells.h MapGate) says which gate A replaces.
//
// The pixel sums are per-block partials summed in order (deterministic): the forward's column
// sums of H_t [B, pixel tile, C] by the next step's gate kernel (PooledGatePreacts), the
// backward's (a tile reduction, layer_common.cuh: a block is kTileC channels × kRows pixel rows
// of one sample and one split of the pixels) [split, B, ·] by the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layer_common.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

namespace pooled = cells::pooled;
namespace attention = cells::attention;

// max(a, b) that keeps a NaN of either (as torch.amax does).
template <typename T>
__host__ __device__ inline T nan_max(T a, T b) {
  return b != b || b > a ? b : a;
}

__host__ __device__ inline int pooled_gate_count(int map_gate) {
  return map_gate == cells::kNoMapGate ? 3 : 2;
}

// The per-(b, c) pooled gates (i, f, o); the map gate's slot is left at 1.
template <typename acc_t, typename scalar_t>
__host__ __device__ inline void pooled_gates(const scalar_t* gate_pre, int64_t channels, int64_t c,
                                             int map_gate, int64_t activation, acc_t* i,
                                             acc_t* f, acc_t* o) {
  const acc_t g0 = gate_activation(acc_t(gate_pre[c]), activation);
  const acc_t g1 = gate_activation(acc_t(gate_pre[channels + c]), activation);
  if (map_gate == cells::kNoMapGate) {
    *i = g0, *f = g1, *o = gate_activation(acc_t(gate_pre[2 * channels + c]), activation);
  } else if (map_gate == cells::kMapIsInputGate) {
    *i = acc_t(1), *f = g0, *o = g1;
  } else {
    *i = g0, *f = g1, *o = acc_t(1);
  }
}

// The bits of `value` as a `To` of the same size (memcpy: a register move on the device, where
// CUDA supports it, and in the emulation build alike).
template <typename To, typename From>
__host__ __device__ inline To bits_as(From value) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: the sizes differ");
  To out;
  memcpy(&out, &value, sizeof out);
  return out;
}

// The fp32 cell state between the forward steps of a–d as one step reads and writes it (the host
// side: LayerCellState; the Triton twin: triton_kernels/_common.py CellState). In bfloat16 the
// saved C_t, which every step writes for the backward anyway, is the high half of C_t's fp32
// bits rounded half away from zero (a NaN stays one), and the state proper is only the low half
// (int16 rows): exact, 4 bytes read and 4 written an element and step where an fp32 copy beside
// the saved C_t took 4 and 6. Other dtypes keep fp32 (double: double) rows in place. The walk's
// first step reads c0 itself (NCHW, in the dtype); its last writes c_n (NCHW) and no state.
template <typename scalar_t>
struct StepCellState {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kSplit = std::is_same_v<scalar_t, at::BFloat16>;

  acc_t* state;            // [B·HW, C] (not split) or nullptr
  int16_t* low;            // [B·HW, C] the low halves (split) or nullptr
  const scalar_t* prev;    // first: c0 [B, C, H, W]; else (split) the saved C_{t−1} rows
  scalar_t* saved;         // [B·HW, C] this step's saved C_t (may be prev itself: read first)
  scalar_t* c_n;           // [B, C, H, W] at the last step, else nullptr
  bool first, last;

  // C_{t−1} of element idx (rows) = nchw (NCHW).
  __host__ __device__ acc_t load(int64_t idx, int64_t nchw) const {
    if (first) return acc_t(prev[nchw]);
    if constexpr (kSplit) {
      const uint32_t high = prev[idx].x, lo = uint16_t(low[idx]);
      // The high half was rounded up (by one unit of its last place) iff lo >= 2^15.
      const uint32_t bits = (high << 16) + lo;
      return bits_as<float>(lo >= 0x8000u ? bits - 0x10000u : bits);
    } else {
      return state[idx];
    }
  }

  __host__ __device__ void store(int64_t idx, int64_t nchw, acc_t c) const {
    scalar_t rounded;
    if constexpr (kSplit) {
      const uint32_t bits = bits_as<uint32_t>(c);
      const uint16_t high = c != c ? uint16_t(0x7FC0) : uint16_t((bits + 0x8000u) >> 16);
      rounded = scalar_t(high, scalar_t::from_bits());
      if (!last) low[idx] = int16_t(uint16_t(bits & 0xFFFFu));
    } else {
      rounded = scalar_t(c);
      if (!last) state[idx] = c;
    }
    saved[idx] = rounded;
    if (last) c_n[nchw] = rounded;
  }
};

// The cell update of one element (idx in rows, nchw in NCHW) given its gates and G (rounded):
// C_{t−1} from the state, C_t into it (and the saved C_t), G stored; returns H_t rounded (what
// the caller stores and the column sums add).
template <typename scalar_t, typename acc_t>
__host__ __device__ inline acc_t pooled_cell_element(acc_t i, acc_t f, acc_t o, scalar_t g,
                                                     int64_t idx, int64_t nchw,
                                                     const StepCellState<scalar_t>& cell,
                                                     scalar_t* cand_saved) {
  acc_t h;
  const acc_t c_new = cell_update(i, f, o, acc_t(g), cell.load(idx, nchw), &h);
  cell.store(idx, nchw, c_new);
  cand_saved[idx] = g;
  return acc_t(scalar_t(h));
}

// One term of the pooled gates: Σ_k (Σ_split sums[b, split, k] / HW) · weight[j, k], the mean of
// maps over the pixels from their column sums per pixel tile [B, splits, K] (the SepConv
// kernels': SepconvCellStep's of H_t, SepconvRows' of X or X̃) against a weight row [·, K] in
// the dtype; `sums` nullptr: no term.
template <typename scalar_t>
struct PooledTerm {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* sums;
  const scalar_t* weight;
  int64_t splits, channels;

  __host__ __device__ acc_t dot(int64_t b, int64_t j, acc_t inv_pixels) const {
    const acc_t* maps = sums + b * splits * channels;
    const scalar_t* w = weight + j * channels;
    acc_t z = acc_t(0);
    for (int64_t k = 0; k < channels; ++k) {
      acc_t column = acc_t(0);
      for (int64_t s = 0; s < splits; ++s) column += maps[s * channels + k];
      z += column * inv_pixels * acc_t(w[k]);
    }
    return z;
  }
};

// The pooled gates' pre-activations, one thread per (sample b, gate row j), straight from the
// column sums (no GAP pass and no GEMM call of their own):
//   out[b, j] = base[b, j] (or bias[j]) + Σ_k x̄[b, k]·U_x[j, k] + Σ_k h̄[b, k]·U_h[j, k]
// each term only where given, in the accumulation dtype, stored once as out_t: a step's saved
// gate_pre (rounded; the epilogue reads it rounded), or a/c/d's xg = U_x·x̄ + b_g of all T·B
// samples before the loop (fp32), which their steps' gates take as the base.
template <typename scalar_t, typename out_t>
struct PooledGatePreacts {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* base;     // [B, rows] or nullptr
  const scalar_t* bias;  // [rows] (without base)
  PooledTerm<scalar_t> x, h;
  out_t* out;            // [B, rows]
  int64_t rows;
  acc_t inv_pixels;

  __host__ __device__ void operator()(int64_t idx) const {
    const int64_t b = idx / rows, j = idx % rows;
    acc_t z = base != nullptr ? base[idx] : acc_t(bias[j]);
    if (x.sums != nullptr) z += x.dot(b, j, inv_pixels);
    if (h.sums != nullptr) z += h.dot(b, j, inv_pixels);
    out[idx] = out_t(z);
  }
};

// Column sums of H_0 [B, C, H, W] (the op's h0) in hsum_partial's layout [B, splits, C]: all in
// split 0, the others zero, so that the first step's gates read them as any step's.
inline Tensor initial_hidden_sums(const Tensor& h0, int64_t splits, at::ScalarType acc) {
  const int64_t B = h0.size(0), C = h0.size(1);
  Tensor sums = at::zeros({B, splits, C}, h0.options().dtype(acc));
  sums.select(1, 0).copy_(h0.sum({2, 3}, false, acc));
  return sums;
}

// PooledGatePreacts into `out` [B, rows] (x's dtype or the accumulation dtype, contiguous): the
// base [B, rows] (accumulation dtype) or else `bias` [rows], plus the term of `x_sums` [B,
// splits, Cin] with weight_x [rows, Cin] and that of `h_sums` [B, splits, C] with weight_h
// [rows, C] where defined (sums in the accumulation dtype, weights and bias in x's dtype).
inline void pooled_gate_preacts(const Tensor& base, const Tensor& bias, const Tensor& x_sums,
                                const Tensor& weight_x, const Tensor& h_sums,
                                const Tensor& weight_h, Tensor out, int64_t pixels) {
  const int64_t rows = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bias.defined() ? bias.scalar_type()
                                                                            : weight_h.scalar_type(),
                                  "pooled_gate_preacts", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto term = [&](const Tensor& sums, const Tensor& weight) {
      if (!sums.defined()) return PooledTerm<scalar_t>{nullptr, nullptr, 0, 0};
      TORCH_INTERNAL_ASSERT(sums.is_contiguous() && weight.is_contiguous() &&
                            weight.size(0) == rows && weight.size(1) == sums.size(2));
      return PooledTerm<scalar_t>{sums.const_data_ptr<acc_t>(), weight.const_data_ptr<scalar_t>(),
                                  sums.size(1), sums.size(2)};
    };
    const acc_t* base_ptr = base.defined() ? base.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    TORCH_INTERNAL_ASSERT(out.is_contiguous() && (base_ptr != nullptr || bias_ptr != nullptr));
    const auto launch = [&](auto* out_ptr) {
      using out_t = std::remove_pointer_t<decltype(out_ptr)>;
      launch_elementwise(
          PooledGatePreacts<scalar_t, out_t>{base_ptr, bias_ptr, term(x_sums, weight_x),
                                             term(h_sums, weight_h), out_ptr, rows,
                                             acc_t(1) / acc_t(pixels)},
          out.numel(), out);
    };
    if (out.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
      launch(out.mutable_data_ptr<scalar_t>());
    } else {
      launch(out.mutable_data_ptr<acc_t>());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Fused SepConv products (phased kernels, layer_common.cuh). A block is kM pixels of one map ×
// kN output channels; per chunk of kK input channels it computes the depthwise of its map on the
// fly (depthwise_at, rounded to the input dtype as depthwise_forward rounds it) into shared
// memory beside its pw slice and multiplies them (half/bfloat16: wmma tensor cores, 16×16×16
// tiles, two per warp; float and double, and every dtype in the emulation build, kMicro×kMicro
// register tiles), so no depthwise output is written and no GEMM call is made. The product
// lands in shared memory for an epilogue of the kernel's own:
//   SepconvCellStep — the candidate's H side and the cell of a step of a–d, after the gate
//     kernel (PooledGatePreacts): xc[t] (b: SepConv_x(X̃) + b_c) added (cand_preact rounded
//     once, as the addmm it replaces), c/d's A = exp(Z − max Z) as a gate, the cell
//     (pooled_cell_element), H_t (NCHW), C_t, G (and A) and the block's column sums of H_t
//     stored (hsum_partial [B, pixel tiles, C], which the next step's gates sum in a fixed
//     order);
//   SepconvRows — SepConv of maps as channels-last rows, with a bias, an addend and tanh on the
//     way out: the X side of a, c, d from x read in place (NCHW planes, any order of its first
//     two dims; sepconv_frames), c/d's per-step F = tanh(SepConv_ha(H) + xa[t]) and Z =
//     SepConv_z(F) (its per-tile max beside), and b's F and SepConv_x(A∘X_t) (sepconv_maps,
//     sepconv_scaled_frame).
template <typename scalar_t>
struct WmmaType {
  using type = void;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
struct SepconvTile {
  static constexpr int kM = 64, kN = 64, kK = 32, kMicro = 4;
};
template <>
struct SepconvTile<double> {
  static constexpr int kM = 32, kN = 32, kK = 16, kMicro = 2;
};

template <typename scalar_t, bool tensor_cores = !std::is_void_v<typename WmmaType<scalar_t>::type>>
struct SepconvFragments {};
template <typename scalar_t>
struct SepconvFragments<scalar_t, true> {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
};

// The product part: the depthwise weight dw [Cin, 1, K, K] and pw [C, Cin] (out, in) of one
// SepConv, over maps of height × width pixels.
template <typename scalar_t>
struct SepconvProduct {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = SepconvTile<scalar_t>;
  static constexpr int kM = Tile::kM, kN = Tile::kN, kK = Tile::kK, kMicro = Tile::kMicro;
  static constexpr int kThreadCols = kN / kMicro;  // the register tiles' thread grid
  static constexpr int kGroups = kThreads / kN;    // epilogue threads per channel
  static constexpr bool kTensorCores = !std::is_void_v<typename WmmaType<scalar_t>::type>;
  static_assert((kM / kMicro) * kThreadCols == kThreads, "one register tile per thread");
  static_assert(!kTensorCores || (kM / 16) * (kN / 16) == 2 * (kThreads / 32),
                "two 16×16 wmma tiles per warp");
  static_assert(kK % 16 == 0 && kThreads % kN == 0);

  struct Shared {
    alignas(32) scalar_t a[kM][kK + 8];  // the depthwise of the map: this chunk's channels
    alignas(32) scalar_t b[kK][kN + 8];  // pwᵀ: this chunk's rows, the block's columns
    alignas(32) acc_t acc[kM][kN + 4];   // the product, for the epilogue
    acc_t sums[kGroups][kN];             // per-group column sums (SepconvCellStep)
  };
  struct Regs {
    acc_t acc[kMicro][kMicro];
    SepconvFragments<scalar_t> frags;
  };

  const scalar_t* dw;
  const scalar_t* pw;
  int64_t height, width, in_channels, channels, kernel;

  __host__ __device__ int64_t chunks() const { return (in_channels + kK - 1) / kK; }

  // The epilogues' threads: thread tid serves column n = tid % kN (channel c) of the block at
  // its rows m = group, group + kGroups, … (group = tid / kN), pixels p0 + m.
  struct Column {
    int n, group;
    int64_t c, p0;
  };
  __host__ __device__ static Column column(dim3 block, unsigned tid) {
    const int n = int(tid) % kN;
    return {n, int(tid) / kN, int64_t(block.x) * kN + n, int64_t(block.y) * kM};
  }

  // The wmma tiles of warp w: rows 16·(w / 2), columns 32·(w % 2) and 32·(w % 2) + 16.
  __host__ __device__ static int warp_row(unsigned tid) { return int(tid / 32) / 2 * 16; }
  __host__ __device__ static int warp_col(unsigned tid) { return int(tid / 32) % 2 * 32; }
  // The register tile of thread tid: rows kMicro·(tid / kThreadCols) + i, columns
  // tid % kThreadCols + j·kThreadCols (a warp reads consecutive columns of b).
  __host__ __device__ static int micro_row(unsigned tid) { return int(tid) / kThreadCols * kMicro; }
  __host__ __device__ static int micro_col(unsigned tid) { return int(tid) % kThreadCols; }

  __host__ __device__ void init(Regs& r, unsigned) const {
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) r.acc[i][j] = acc_t(0);
#ifdef __CUDA_ARCH__
    if constexpr (kTensorCores) {
      for (auto& f : r.frags.acc) nvcuda::wmma::fill_fragment(f, 0.0f);
    }
#endif
  }

  // Chunk `chunk` of the block's operands: the depthwise of `map` (element (pixel p, channel c)
  // at map[c · channel_stride + p · pixel_stride]) at pixels block.y·kM …, and pw's block of
  // columns block.x·kN …. Consecutive threads take consecutive addresses of the map: pixels of
  // an NCHW plane (pixel_stride 1), else channels. `scale` [H·W]: the map is scale∘map
  // (depthwise_at).
  __host__ __device__ void stage_map(Shared& s, dim3 block, unsigned tid, int64_t chunk,
                                     const scalar_t* map, int64_t channel_stride,
                                     int64_t pixel_stride,
                                     const scalar_t* scale = nullptr) const {
    const int64_t k0 = chunk * kK, p0 = int64_t(block.y) * kM, n0 = int64_t(block.x) * kN;
    const int64_t pixels = height * width;
    for (int e = int(tid); e < kM * kK; e += kThreads) {
      const int m = pixel_stride == 1 ? e % kM : e / kK, k = pixel_stride == 1 ? e / kM : e % kK;
      const int64_t p = p0 + m, c = k0 + k;
      const acc_t d = p < pixels && c < in_channels
                          ? depthwise_at<acc_t>(map, dw, p / width, p % width, c, height, width,
                                                channel_stride, pixel_stride, kernel, scale)
                          : acc_t(0);
      s.a[m][k] = scalar_t(d);
    }
    for (int e = int(tid); e < kK * kN; e += kThreads) {
      const int n = e / kK, k = e % kK;
      const int64_t c_out = n0 + n, c_in = k0 + k;
      s.b[k][n] = c_out < channels && c_in < in_channels ? pw[c_out * in_channels + c_in]
                                                         : scalar_t(0);
    }
  }

  __host__ __device__ void multiply(Shared& s, Regs& r, dim3, unsigned tid, int64_t) const {
#ifdef __CUDA_ARCH__
    if constexpr (kTensorCores) {
      namespace wmma = nvcuda::wmma;
      using T = typename WmmaType<scalar_t>::type;
      const int m0 = warp_row(tid), n0 = warp_col(tid);
      for (int k = 0; k < kK; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, reinterpret_cast<const T*>(&s.a[m0][k]), kK + 8);
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const T*>(&s.b[k][n0 + 16 * f]), kN + 8);
          wmma::mma_sync(r.frags.acc[f], a, b, r.frags.acc[f]);
        }
      }
      return;
    }
#endif
    const int m0 = micro_row(tid), n0 = micro_col(tid);
    for (int k = 0; k < kK; ++k) {
      acc_t a[kMicro], b[kMicro];
      for (int i = 0; i < kMicro; ++i) a[i] = acc_t(s.a[m0 + i][k]);
      for (int j = 0; j < kMicro; ++j) b[j] = acc_t(s.b[k][n0 + j * kThreadCols]);
      for (int i = 0; i < kMicro; ++i)
        for (int j = 0; j < kMicro; ++j) r.acc[i][j] += a[i] * b[j];
    }
  }

  __host__ __device__ void finish(Shared& s, Regs& r, unsigned tid) const {
#ifdef __CUDA_ARCH__
    if constexpr (kTensorCores) {
      const int m0 = warp_row(tid), n0 = warp_col(tid);
      for (int f = 0; f < 2; ++f) {
        nvcuda::wmma::store_matrix_sync(&s.acc[m0][n0 + 16 * f], r.frags.acc[f], kN + 4,
                                        nvcuda::wmma::mem_row_major);
      }
      return;
    }
#endif
    const int m0 = micro_row(tid), n0 = micro_col(tid);
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) s.acc[m0 + i][n0 + j * kThreadCols] = r.acc[i][j];
  }
};

template <typename scalar_t>
using SepconvShared = typename SepconvProduct<scalar_t>::Shared;

// Block x: the channel tile, y: the pixel tile, z: the sample. With the channel attention
// (c, d: map_gate), A = exp(Z − max Z) replaces the gate cells.h names, per element.
template <typename scalar_t>
struct SepconvCellStep : SepconvProduct<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using Shared = SepconvShared<scalar_t>;

  const scalar_t* h_prev;    // [B, C, H, W] NCHW (the layer's output at step t − 1, or h0)
  const scalar_t* xc;        // [B, HW, C]: SepConv_x(X_t) + b_c
  const scalar_t* gate_pre;  // [B, n·C], n = pooled_gate_count(map_gate)
  const scalar_t* logits;    // [B, HW, C] Z (c, d) or nullptr
  const scalar_t* logits_tile_max;  // [B, tiles_m, C] Z's max per pixel tile (c, d; SepconvRows)
  StepCellState<scalar_t> cell;  // C_{t−1} in, C_t out (and the saved C_t, c_n at the last)
  scalar_t* h_out;           // [B, C, H, W] NCHW (the layer's output at step t)
  scalar_t* h_n;             // [B, C, H, W] at the walk's last step, else nullptr
  scalar_t* cand_saved;
  scalar_t* map_saved;       // [B, HW, C] A (c, d)
  acc_t* hsum_partial;       // [B, tiles_m, C]
  int map_gate;
  int64_t activation, tiles_m;

  __host__ __device__ void stage(Shared& s, dim3 block, unsigned tid, int64_t chunk) const {
    const int64_t pixels = this->height * this->width;
    this->stage_map(s, block, tid, chunk, h_prev + int64_t(block.z) * this->channels * pixels,
                    pixels, 1);
  }

  __host__ __device__ void epilogue(Shared& s, dim3 block, unsigned tid) const {
    const int64_t channels = this->channels, pixels = this->height * this->width;
    const auto col = this->column(block, tid);
    const int64_t b = block.z;
    acc_t sum = 0;
    if (col.c < channels) {
      acc_t i, f, o;
      pooled_gates(gate_pre + b * pooled_gate_count(map_gate) * channels, channels, col.c,
                   map_gate, activation, &i, &f, &o);
      // max_p Z of the column from Z's per-tile maxima (exact: the max of the rounded values,
      // NaN kept, as torch.amax).
      acc_t zmax = acc_t(0);
      if (logits != nullptr) {
        const scalar_t* tile_max = logits_tile_max + b * tiles_m * channels + col.c;
        zmax = acc_t(tile_max[0]);
        for (int64_t tile = 1; tile < tiles_m; ++tile) {
          zmax = nan_max(zmax, acc_t(tile_max[tile * channels]));
        }
      }
      for (int m = col.group; m < this->kM && col.p0 + m < pixels; m += this->kGroups) {
        const int64_t idx = (b * pixels + col.p0 + m) * channels + col.c;
        const int64_t nchw = (b * channels + col.c) * pixels + col.p0 + m;
        if (logits != nullptr) {
          // A = exp(Z − max Z) (eq. 23 without overflow), rounded once and used as saved.
          const scalar_t a = scalar_t(math_exp(acc_t(logits[idx]) - zmax));
          map_saved[idx] = a;
          if (map_gate == cells::kMapIsInputGate) i = acc_t(a); else o = acc_t(a);
        }
        const scalar_t pre = scalar_t(s.acc[m][col.n] + acc_t(xc[idx]));
        const acc_t h = pooled_cell_element(i, f, o, scalar_t(math_tanh(acc_t(pre))), idx,
                                            nchw, cell, cand_saved);
        s.acc[m][col.n] = h;  // H_t (rounded), for store's NCHW write
        sum += h;
      }
    }
    s.sums[col.group][col.n] = sum;
  }

  // The column sums, and H_t into the NCHW output (and h_n at the last step) with pixels
  // across the threads (coalesced).
  __host__ __device__ void store(Shared& s, dim3 block, unsigned tid) const {
    const int64_t channels = this->channels, pixels = this->height * this->width;
    const int64_t n0 = int64_t(block.x) * this->kN, p0 = int64_t(block.y) * this->kM;
    if (int(tid) < this->kN && n0 + tid < channels) {
      acc_t total = 0;
      for (int g = 0; g < this->kGroups; ++g) total += s.sums[g][tid];
      hsum_partial[(int64_t(block.z) * tiles_m + block.y) * channels + n0 + tid] = total;
    }
    for (int e = int(tid); e < this->kM * this->kN; e += kThreads) {
      const int m = e % this->kM, n = e / this->kM;
      if (p0 + m < pixels && n0 + n < channels) {
        const int64_t nchw = (int64_t(block.z) * channels + n0 + n) * pixels + p0 + m;
        h_out[nchw] = scalar_t(s.acc[m][n]);
        if (h_n != nullptr) h_n[nchw] = scalar_t(s.acc[m][n]);
      }
    }
  }
};

// Block x: the channel tile, y: the pixel tile, z: the map. Map z is at
// in + (z / batch)·stride_t + (z % batch)·stride_b with (channel_stride, pixel_stride) as in
// depthwise_at; its rows out[z·HW + p] = act(product + bias[c] + addend[z·HW + p]) (each extra
// only where given; rounded to the dtype once, then tanh rounded again: the addmm and tanh_
// it replaces). With tile_max, each block also writes the max of its rows' values per channel
// (c/d's Z: the per-(b, c) max over the pixels without a pass of its own); with pixel_scale
// [maps, HW], map z is multiplied by its row of it first (b's X̃ = A∘X_t, read as X_t). With
// in_sums, the blocks of the first channel tile also write the column sums of their pixels of
// the (scaled) map [maps, pixel tiles, Cin] in the accumulation dtype: GAP(X) (a, c, d) and
// GAP(X̃) (b) without a pass over X of their own. Per chunk, stage leaves kK × kSumGroups
// partials (kSumGroups pixels apart) in shared memory, which multiply adds in a fixed order.
template <typename scalar_t>
struct SepconvRows : SepconvProduct<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using Shared = SepconvShared<scalar_t>;
  using Regs = typename SepconvProduct<scalar_t>::Regs;
  static constexpr int kSumGroups = kThreads / SepconvProduct<scalar_t>::kK;
  static_assert(kThreads <= SepconvProduct<scalar_t>::kGroups * SepconvProduct<scalar_t>::kN,
                "the partial column sums fit in Shared::sums");

  const scalar_t* in;
  const scalar_t* bias;    // [C] or nullptr
  const scalar_t* addend;  // [maps·HW, C] or nullptr
  scalar_t* out;           // [maps·HW, C]
  scalar_t* tile_max;      // [maps, pixel tiles, C] or nullptr
  const scalar_t* pixel_scale;  // [maps, HW] or nullptr
  acc_t* in_sums;               // [maps, pixel tiles, Cin] or nullptr
  int64_t batch, stride_t, stride_b, channel_stride, pixel_stride;
  bool tanh_out;

  __host__ __device__ void stage(Shared& s, dim3 block, unsigned tid, int64_t chunk) const {
    const int64_t map = block.z, pixels = this->height * this->width;
    const scalar_t* plane = in + map / batch * stride_t + map % batch * stride_b;
    const scalar_t* scale = pixel_scale != nullptr ? pixel_scale + map * pixels : nullptr;
    this->stage_map(s, block, tid, chunk, plane, channel_stride, pixel_stride, scale);
    if (in_sums == nullptr || block.x != 0) return;
    // Partial (k, g): the chunk's channel k over the pixels g, g + kSumGroups, … of the tile;
    // consecutive threads take consecutive addresses of the map, as stage_map's.
    const int e = int(tid);
    const int k = pixel_stride == 1 ? e / kSumGroups : e % this->kK;
    const int g = pixel_stride == 1 ? e % kSumGroups : e / this->kK;
    const int64_t c = chunk * this->kK + k, p0 = int64_t(block.y) * this->kM;
    acc_t sum = acc_t(0);
    if (c < this->in_channels) {
      for (int m = g; m < this->kM && p0 + m < pixels; m += kSumGroups) {
        sum += acc_t(map_value<acc_t>(plane + c * channel_stride, p0 + m, pixel_stride, scale));
      }
    }
    (&s.sums[0][0])[k * kSumGroups + g] = sum;
  }

  __host__ __device__ void multiply(Shared& s, Regs& r, dim3 block, unsigned tid,
                                    int64_t chunk) const {
    SepconvProduct<scalar_t>::multiply(s, r, block, tid, chunk);
    const int64_t c = chunk * this->kK + tid;
    if (in_sums == nullptr || block.x != 0 || int(tid) >= this->kK || c >= this->in_channels) {
      return;
    }
    acc_t total = acc_t(0);
    for (int g = 0; g < kSumGroups; ++g) total += (&s.sums[0][0])[tid * kSumGroups + g];
    const int64_t tiles = (this->height * this->width + this->kM - 1) / this->kM;
    in_sums[(int64_t(block.z) * tiles + block.y) * this->in_channels + c] = total;
  }

  __host__ __device__ void epilogue(Shared& s, dim3 block, unsigned tid) const {
    const int64_t channels = this->channels, pixels = this->height * this->width;
    const auto col = this->column(block, tid);
    if (col.c >= channels) return;
    const acc_t b = bias != nullptr ? acc_t(bias[col.c]) : acc_t(0);
    acc_t peak = acc_t(-INFINITY);
    for (int m = col.group; m < this->kM && col.p0 + m < pixels; m += this->kGroups) {
      const int64_t idx = (int64_t(block.z) * pixels + col.p0 + m) * channels + col.c;
      const scalar_t pre =
          scalar_t(s.acc[m][col.n] + b + (addend != nullptr ? acc_t(addend[idx]) : acc_t(0)));
      const scalar_t value = tanh_out ? scalar_t(math_tanh(acc_t(pre))) : pre;
      out[idx] = value;
      peak = nan_max(peak, acc_t(value));
    }
    s.sums[col.group][col.n] = peak;
  }

  // With tile_max: the block's per-channel max over its pixel groups.
  __host__ __device__ void store(Shared& s, dim3 block, unsigned tid) const {
    const int64_t n0 = int64_t(block.x) * this->kN;
    if (tile_max == nullptr || int(tid) >= this->kN || n0 + tid >= this->channels) return;
    acc_t peak = s.sums[0][tid];
    for (int g = 1; g < this->kGroups; ++g) peak = nan_max(peak, s.sums[g][tid]);
    const int64_t tiles = (this->height * this->width + this->kM - 1) / this->kM;
    tile_max[(int64_t(block.z) * tiles + block.y) * this->channels + n0 + tid] = scalar_t(peak);
  }
};

template <typename scalar_t>
void launch_sepconv_rows(const scalar_t* in, int64_t maps, int64_t batch, int64_t stride_t,
                         int64_t stride_b, int64_t channel_stride, int64_t pixel_stride,
                         const Tensor& dw, const Tensor& pw, const Tensor& bias,
                         const Tensor& addend, bool tanh_out, Tensor& out, int64_t height,
                         int64_t width, const Tensor& like, const Tensor& tile_max = Tensor(),
                         const Tensor& pixel_scale = Tensor(), const Tensor& in_sums = Tensor()) {
  using acc_t = at::opmath_type<scalar_t>;
  using Rows = SepconvRows<scalar_t>;
  const int64_t cin = pw.size(1), channels = pw.size(0);
  const Tensor dw_c = dw.contiguous(), pw_c = pw.contiguous();
  const Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  TORCH_INTERNAL_ASSERT(!addend.defined() || (addend.is_contiguous() &&
                                              addend.numel() == out.numel()));
  const int64_t tiles_m = ceil_div(height * width, Rows::kM);
  TORCH_INTERNAL_ASSERT(!tile_max.defined() || (tile_max.is_contiguous() &&
                                                tile_max.numel() == maps * tiles_m * channels));
  TORCH_INTERNAL_ASSERT(!pixel_scale.defined() || (pixel_scale.is_contiguous() &&
                                                   pixel_scale.numel() == maps * height * width));
  TORCH_INTERNAL_ASSERT(!in_sums.defined() ||
                        (in_sums.is_contiguous() && in_sums.numel() == maps * tiles_m * cin &&
                         in_sums.scalar_type() == c10::CppTypeToScalarType<acc_t>::value));
  launch_phased(
      Rows{{dw_c.const_data_ptr<scalar_t>(), pw_c.const_data_ptr<scalar_t>(), height, width, cin,
            channels, dw.size(-1)},
           in, bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
           addend.defined() ? addend.const_data_ptr<scalar_t>() : nullptr,
           out.mutable_data_ptr<scalar_t>(),
           tile_max.defined() ? tile_max.mutable_data_ptr<scalar_t>() : nullptr,
           pixel_scale.defined() ? pixel_scale.const_data_ptr<scalar_t>() : nullptr,
           in_sums.defined() ? in_sums.mutable_data_ptr<acc_t>() : nullptr, batch, stride_t,
           stride_b, channel_stride, pixel_stride, tanh_out},
      ceil_div(channels, Rows::kN), tiles_m, maps, like);
}

// x [T, B, Cin, H, W] itself where every frame's planes are contiguous (whatever the order of
// its first two dims), else one contiguous copy: what the SepConv kernels read X_t in place from.
inline Tensor frame_planes(const Tensor& x) {
  const int64_t H = x.size(3), W = x.size(4);
  return x.stride(2) == H * W && x.stride(3) == W && x.stride(4) == 1 ? x : x.contiguous();
}

// SepConv(X) + bias of every frame of x [T, B, Cin, H, W] (frame_planes), dw [Cin, 1, K, K],
// pw [C, Cin], bias [C] -> time-first channels-last rows [T·B·H·W, C] of x's dtype; with
// `pixel_sums` [T·B, sepconv_cell_splits, Cin] (accumulation dtype), each frame's column sums
// per pixel tile into it (pooled_gate_preacts' x_sums).
inline Tensor sepconv_frames(const Tensor& x, const Tensor& dw, const Tensor& pw,
                             const Tensor& bias, const Tensor& pixel_sums = Tensor()) {
  const int64_t T = x.size(0), B = x.size(1), H = x.size(3), W = x.size(4);
  const Tensor frames = frame_planes(x);
  Tensor out = at::empty({T * B * H * W, pw.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sepconv_frames",
                                  [&] {
    launch_sepconv_rows(frames.const_data_ptr<scalar_t>(), T * B, B, frames.stride(0),
                        frames.stride(1), H * W, 1, dw, pw, bias, Tensor(), false, out, H, W, x,
                        Tensor(), Tensor(), pixel_sums);
  });
  return out;
}

// SepConv(scale∘X_t) + bias of frame t of `frames` (frame_planes of x), scale [B, H·W] (b's A,
// so the rows are SepConv(X̃) + b_c with X̃ never written) -> rows [B·H·W, C]; with
// `pixel_sums` [B, sepconv_cell_splits, Cin], X̃'s column sums per pixel tile into it.
inline Tensor sepconv_scaled_frame(const Tensor& frames, int64_t t, const Tensor& scale,
                                   const Tensor& dw, const Tensor& pw, const Tensor& bias,
                                   const Tensor& pixel_sums = Tensor()) {
  const int64_t B = frames.size(1), H = frames.size(3), W = frames.size(4);
  Tensor out = at::empty({B * H * W, pw.size(0)}, frames.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, frames.scalar_type(),
                                  "sepconv_scaled_frame", [&] {
    launch_sepconv_rows(frames.const_data_ptr<scalar_t>() + t * frames.stride(0), B, B, 0,
                        frames.stride(1), H * W, 1, dw, pw, bias, Tensor(), false, out, H, W,
                        frames, Tensor(), scale, pixel_sums);
  });
  return out;
}

// How sepconv_maps' input is laid out: channels-last maps [N, H, W, Cin] (or their rows
// [N·H·W, Cin]), or NCHW planes [N, Cin, H, W] (the op's own layout: its output, h0).
enum class MapLayout { kChannelsLast, kPlanes };

// SepConv of maps (contiguous, in `layout`) -> rows [N·H·W, C] (into `out` when given,
// contiguous): plus `bias` [C] and `addend` (rows of the same shape) when given, then tanh with
// `tanh_out`. The rows do not depend on the layout (depthwise_at sums the taps in one order).
// With `tile_max` [N, sepconv_cell_splits, C], the rows' per-channel max per pixel tile.
inline Tensor sepconv_maps(const Tensor& maps, MapLayout layout, const Tensor& dw,
                           const Tensor& pw, const Tensor& bias, const Tensor& addend,
                           bool tanh_out, int64_t n, int64_t height, int64_t width,
                           Tensor out = Tensor(), const Tensor& tile_max = Tensor()) {
  const int64_t cin = pw.size(1), pixels = height * width;
  TORCH_INTERNAL_ASSERT(maps.is_contiguous() && maps.numel() == n * pixels * cin);
  if (!out.defined()) out = at::empty({n * pixels, pw.size(0)}, maps.options());
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.numel() == n * pixels * pw.size(0));
  const bool planes = layout == MapLayout::kPlanes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "sepconv_maps",
                                  [&] {
    launch_sepconv_rows(maps.const_data_ptr<scalar_t>(), n, n, 0, pixels * cin,
                        planes ? pixels : 1, planes ? 1 : cin, dw, pw, bias, addend, tanh_out,
                        out, height, width, maps, tile_max);
  });
  return out;
}

// The pixel tiles per sample of the fused (a) step: the splits of its column sums.
inline int64_t sepconv_cell_splits(int64_t pixels, at::ScalarType dtype) {
  return ceil_div(pixels, dtype == at::kDouble ? SepconvTile<double>::kM : SepconvTile<float>::kM);
}

// What one forward step of a–d reads and writes of the cell state (StepCellState, as
// LayerCellState hands it): the state (int16 low halves in bfloat16, else fp32/double rows),
// `prev` (c0 at the walk's first step, the saved C_{t−1} in bfloat16), the step's saved C_t, and
// at the last step h_n and c_n.
struct CellStep {
  Tensor state, prev, saved, h_n, c_n;
  bool first, last;
};

// The host side of StepCellState over a layer's walk (the Triton twin: _common.py CellState):
// the state, what each step reads beside it, h_n and c_n. With lengths (step_mask.h) the state
// starts as C_0 (a sample whose step does not count keeps it, carry), the first and last steps
// are steps like the others, and h_n, c_n are taken after the loop (outputs).
class LayerCellState {
 public:
  // `cells`: the saved C_t of every step (SavedSteps' index `cell_index`).
  LayerCellState(const Tensor& h0, const Tensor& c0, const SavedSteps& cells, size_t cell_index,
                 const StepMask& mask, const Walk& walk)
      : cells_(cells), cell_index_(cell_index), mask_(mask), walk_(walk),
        split_(c0.scalar_type() == at::kBFloat16), c0_(c0.contiguous()) {
    const int64_t rows = c0.size(0) * c0.size(2) * c0.size(3), channels = c0.size(1);
    const auto acc = acc_dtype(c0);
    if (mask.active()) {
      if (split_) initial_ = channels_last_copy(c0, c0.scalar_type()).view({rows, channels});
      state_ = split_ ? at::zeros({rows, channels}, c0.options().dtype(at::kShort))
                      : channels_last_copy(c0, acc).view({rows, channels});
    } else {
      state_ = at::empty({rows, channels}, c0.options().dtype(split_ ? at::kShort : acc));
      h_n_ = at::empty(h0.sizes(), h0.options());
      c_n_ = at::empty(c0.sizes(), c0.options());
    }
  }

  CellStep step(int64_t t) const {
    const bool first = !mask_.active() && walk_.is_first(t);
    const bool last = !mask_.active() && walk_.is_last(t);
    return {state_, split_ && !first ? prev(t) : c0_, cells_(cell_index_, t),
            last ? h_n_ : Tensor(), last ? c_n_ : Tensor(), first, last};
  }

  // With lengths, before step t: the state and the saved C_{t−1} it reads (copies: without
  // saving, the saved C_t is written over it).
  std::pair<Tensor, Tensor> hold(int64_t t) const {
    if (!mask_.active()) return {};
    return {state_.clone(), split_ ? prev(t).clone() : Tensor()};
  }

  // With lengths, after step t: the samples whose step does not count keep C (the state, and in
  // bfloat16 the saved C_t, which is part of it).
  void carry(int64_t t, const std::pair<Tensor, Tensor>& held, int64_t batch) const {
    if (!mask_.active()) return;
    mask_.carry(t, state_.view({batch, -1}), held.first.view({batch, -1}));
    if (split_) {
      mask_.carry(t, cells_(cell_index_, t).view({batch, -1}), held.second.view({batch, -1}));
    }
  }

  // (h_n, c_n): as the last step wrote them, or with lengths the H carry and each sample's
  // carried C.
  std::pair<Tensor, Tensor> outputs(const Tensor& h_carry) const {
    if (!mask_.active()) return {h_n_, c_n_};
    const int64_t batch = c0_.size(0), channels = c0_.size(1);
    const Tensor rows = split_ ? cells_(cell_index_, walk_.last()) : state_;
    return {h_carry, channels_first_copy(rows.view({batch, c0_.size(2), c0_.size(3), channels}),
                                         c0_.scalar_type())};
  }

 private:
  Tensor prev(int64_t t) const {
    return walk_.is_first(t) ? initial_ : cells_(cell_index_, walk_.prev(t));
  }

  const SavedSteps& cells_;
  size_t cell_index_;
  const StepMask& mask_;
  Walk walk_;
  bool split_;
  Tensor c0_, initial_, state_, h_n_, c_n_;
};

// One forward step of a–d after its gates: h_prev and h_out [B, C, H, W] NCHW, the H-side
// weights dw [C, 1, K, K] and pw [C, C] (contiguous), xc_t [B·HW, C] (b: SepConv_x(X̃) + b_c),
// gate_pre [B, n·C]; for c/d (map_gate) Z [B·HW, C], its per-tile maxima [B,
// sepconv_cell_splits, C] (sepconv_maps' tile_max) and map_saved (A), undefined otherwise; the
// cell state as LayerCellState hands it (`cell`); cand_saved this step's slice; the column sums
// of H_t into hsum_partial [B, sepconv_cell_splits, C].
inline void sepconv_cell_forward(const Tensor& h_prev, const Tensor& dw, const Tensor& pw,
                                 const Tensor& xc_t, const Tensor& gate_pre, const Tensor& logits,
                                 const Tensor& logits_tile_max, int map_gate, int64_t activation,
                                 const CellStep& cell, Tensor h_out, Tensor cand_saved,
                                 Tensor map_saved, const Tensor& hsum_partial, int64_t batch,
                                 int64_t height, int64_t width, int64_t channels) {
  const int64_t tiles_m = hsum_partial.size(1);
  TORCH_INTERNAL_ASSERT(tiles_m == sepconv_cell_splits(height * width, h_prev.scalar_type()));
  TORCH_INTERNAL_ASSERT(h_prev.is_contiguous() && h_out.is_contiguous() && dw.is_contiguous() &&
                        pw.is_contiguous() && xc_t.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_prev.scalar_type(),
                                  "sepconv_cell_forward", [&] {
    using Step = SepconvCellStep<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    using State = StepCellState<scalar_t>;
    const bool has_map = logits.defined();
    TORCH_INTERNAL_ASSERT(has_map == (map_gate != cells::kNoMapGate));
    TORCH_INTERNAL_ASSERT(!has_map || logits_tile_max.numel() == batch * tiles_m * channels);
    TORCH_INTERNAL_ASSERT(cell.state.scalar_type() ==
                          (State::kSplit ? at::kShort : c10::CppTypeToScalarType<acc_t>::value));
    TORCH_INTERNAL_ASSERT(cell.prev.is_contiguous() && cell.last == cell.c_n.defined());
    const State state{State::kSplit ? nullptr : cell.state.mutable_data_ptr<acc_t>(),
                      State::kSplit ? cell.state.mutable_data_ptr<int16_t>() : nullptr,
                      cell.prev.const_data_ptr<scalar_t>(), cell.saved.mutable_data_ptr<scalar_t>(),
                      cell.last ? cell.c_n.mutable_data_ptr<scalar_t>() : nullptr, cell.first,
                      cell.last};
    launch_phased(
        Step{{dw.const_data_ptr<scalar_t>(), pw.const_data_ptr<scalar_t>(), height, width,
              channels, channels, dw.size(-1)},
             h_prev.const_data_ptr<scalar_t>(), xc_t.const_data_ptr<scalar_t>(),
             gate_pre.const_data_ptr<scalar_t>(),
             has_map ? logits.const_data_ptr<scalar_t>() : nullptr,
             has_map ? logits_tile_max.const_data_ptr<scalar_t>() : nullptr, state,
             h_out.mutable_data_ptr<scalar_t>(),
             cell.last ? cell.h_n.mutable_data_ptr<scalar_t>() : nullptr,
             cand_saved.mutable_data_ptr<scalar_t>(),
             has_map ? map_saved.mutable_data_ptr<scalar_t>() : nullptr,
             hsum_partial.mutable_data_ptr<acc_t>(), map_gate, activation, tiles_m},
        ceil_div(channels, Step::kN), tiles_m, batch, h_prev);
  });
}

// Backward of one step (walked opposite to the forward), per element (cell_math.h
// cell_update_backward):
//   dH = dH_carry + dO[t];  dC = dC_t + dH∘o∘(1 − tanh²C_t)
//   do = dH∘tanh C_t, di = dC∘G, df = dC∘C_{t−1}, dC_{t−1} = dC∘f
//   dacc = dC∘i∘(1 − G²)                  (gradient of the candidate pre-activation)
//   pooled gates: Σ_p d(gate) in gate_pre's order (sums 0..n−1)
//   map gate A (c: i, d: o):  da_times_a = dA∘A and Σ_p dA∘A (sum 3)
template <typename scalar_t>
struct PooledCellBackward {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;  // dO[t] [B, HW, C]
  const acc_t* dh_carry;     // dH_t from step t+1
  acc_t* dc_state;           // dC_t in, dC_{t−1} out
  const scalar_t* gate_pre;
  const scalar_t* map;       // saved A (c/d) or nullptr
  int map_gate;
  int64_t activation;
  const scalar_t* cand;
  const scalar_t* cell;
  const scalar_t* cell_prev;
  scalar_t* dacc;
  acc_t* da_times_a;         // [B, HW, C] dA∘A (c/d)
  acc_t* gate_partial;       // [split, B, n·C]
  acc_t* map_partial;        // [split, B, C] Σ_p dA∘A (c/d)
  int64_t batch, pixels, channels, pixels_per_split, tiles;

  __host__ __device__ void accumulate(unsigned bx, unsigned by, unsigned, unsigned tx,
                                      unsigned ty, acc_t* sums) const {
    const int64_t b = bx / tiles;
    const int64_t c = (bx % tiles) * kTileC + tx;
    if (c >= channels) return;
    const int64_t begin = int64_t(by) * pixels_per_split;
    const int64_t end = begin + pixels_per_split < pixels ? begin + pixels_per_split : pixels;
    acc_t i, f, o;
    pooled_gates(gate_pre + b * pooled_gate_count(map_gate) * channels, channels, c, map_gate,
                 activation, &i, &f, &o);
    for (int64_t p = begin + ty; p < end; p += kRows) {
      const int64_t idx = (b * pixels + p) * channels + c;
      acc_t a = 0;
      if (map_gate != cells::kNoMapGate) {
        a = acc_t(map[idx]);
        if (map_gate == cells::kMapIsInputGate) i = a; else o = a;
      }
      const acc_t g = acc_t(cand[idx]);
      const acc_t dh = dh_carry[idx] + acc_t(grad_out[idx]);
      acc_t di, df, dg, d_o, dc_prev;
      cell_update_backward(i, f, o, g, acc_t(cell_prev[idx]), acc_t(cell[idx]), dh, dc_state[idx],
                           &di, &df, &dg, &d_o, &dc_prev);
      dc_state[idx] = dc_prev;
      dacc[idx] = scalar_t(dg * tanh_grad_from_output(g));
      if (map_gate == cells::kNoMapGate) {
        sums[0] += di, sums[1] += df, sums[2] += d_o;
      } else {
        const acc_t da = map_gate == cells::kMapIsInputGate ? di : d_o;
        if (map_gate == cells::kMapIsInputGate) {
          sums[0] += df, sums[1] += d_o;
        } else {
          sums[0] += di, sums[1] += df;
        }
        da_times_a[idx] = da * a;
        sums[3] += da * a;
      }
    }
  }

  __host__ __device__ void store(unsigned bx, unsigned by, unsigned, unsigned tx,
                                 const acc_t* totals) const {
    const int64_t b = bx / tiles;
    const int64_t c = (bx % tiles) * kTileC + tx;
    if (c >= channels) return;
    const int n_gates = pooled_gate_count(map_gate);
    for (int q = 0; q < n_gates; ++q) {
      gate_partial[((int64_t(by) * batch + b) * n_gates + q) * channels + c] = totals[q];
    }
    if (map_gate != cells::kNoMapGate) {
      map_partial[(int64_t(by) * batch + b) * channels + c] = totals[3];
    }
  }
};

// dgp = Σ_p d(gate) ∘ σ'(gate_pre)   [B, n·C]
template <typename scalar_t>
struct PooledGateGrad {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* sums;
  const scalar_t* gate_pre;
  int64_t activation;
  acc_t* out;

  __host__ __device__ void operator()(int64_t idx) const {
    out[idx] = sums[idx] * gate_activation_grad(acc_t(gate_pre[idx]), activation);
  }
};

struct PooledCellGrads {
  Tensor gate_grad;  // [B, n·C] pre-activation gradient of the pooled gates (acc dtype)
  Tensor da_times_a_sum;  // [B, C] Σ_p dA∘A (c/d; acc dtype)
};

// One backward step. dc_state [B·HW, C] (acc) holds dC_t and becomes dC_{t−1}; dacc (the step's
// slice, x dtype) receives the candidate pre-activation gradient; da_times_a [B·HW, C] (acc)
// receives dA∘A for c/d (from the saved map A); gate_grad_out (the step's [B, n·C] slice, acc)
// receives dgp.
inline PooledCellGrads pooled_cell_backward(
    const Tensor& grad_out, const Tensor& dh_carry, Tensor& dc_state, const Tensor& gate_pre,
    const Tensor& map, int map_gate, int64_t activation, const Tensor& cand,
    const Tensor& cell, const Tensor& cell_prev, Tensor dacc, Tensor da_times_a,
    Tensor gate_grad_out, int64_t batch, int64_t pixels, int64_t channels) {
  const int64_t tiles = ceil_div(channels, kTileC);
  const int64_t splits = std::min<int64_t>(reduction_splits(batch * tiles, pixels, cand), 65535);
  const int64_t per_split = ceil_div(pixels, splits);
  const int n_gates = pooled_gate_count(map_gate);
  const bool has_map = map_gate != cells::kNoMapGate;
  Tensor gate_partial = at::empty({splits, batch, n_gates * channels}, dc_state.options());
  Tensor map_partial;
  if (has_map) map_partial = at::empty({splits, batch, channels}, dc_state.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cand.scalar_type(),
                                  "pooled_cell_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_tile_reduce<4, acc_t>(
        PooledCellBackward<scalar_t>{
            grad_out.const_data_ptr<scalar_t>(), dh_carry.const_data_ptr<acc_t>(),
            dc_state.mutable_data_ptr<acc_t>(), gate_pre.const_data_ptr<scalar_t>(),
            has_map ? map.const_data_ptr<scalar_t>() : nullptr, map_gate, activation,
            cand.const_data_ptr<scalar_t>(), cell.const_data_ptr<scalar_t>(),
            cell_prev.const_data_ptr<scalar_t>(), dacc.mutable_data_ptr<scalar_t>(),
            has_map ? da_times_a.mutable_data_ptr<acc_t>() : nullptr,
            gate_partial.mutable_data_ptr<acc_t>(),
            has_map ? map_partial.mutable_data_ptr<acc_t>() : nullptr, batch, pixels, channels,
            per_split, tiles},
        batch * tiles, splits, 1, cand);
    const Tensor sums = gate_partial.sum(0);
    launch_elementwise(PooledGateGrad<scalar_t>{sums.const_data_ptr<acc_t>(),
                                                gate_pre.const_data_ptr<scalar_t>(), activation,
                                                gate_grad_out.mutable_data_ptr<acc_t>()},
                       sums.numel(), cand);
  });
  PooledCellGrads grads;
  grads.gate_grad = gate_grad_out;
  if (has_map) grads.da_times_a_sum = map_partial.sum(0);
  return grads;
}

// After the backward loop of b, c, d: the weight gradients of their attention features
// F = tanh(SepConv_xa(X) + SepConv_ha(H_{t−1}) + b_a) over all steps, from dF_pre = dF∘(1 − F²)
// (d_features_pre_all [T·rows, C]) and the gradient of SepConv_ha's depthwise output
// (d_dwha_all), with the depthwise outputs dw_ha(H_{t−1}) and dw_xa(X) of every step:
//   dP_ha = Σ dF_preᵀ·dw_ha,  d dw_ha,  d b_a = Σ dF_pre,  dP_xa = Σ dF_preᵀ·dw_xa,  d dw_xa;
// and F's share of dX, SepConv_xaᵀ(dF_pre), added to grad_x_cl [T·rows, Cin].
inline void attention_features_backward(std::vector<Tensor>& grad_params, at::TensorList params,
                                        const Tensor& d_features_pre_all,
                                        const Tensor& d_dwha_all, const Tensor& dw_ha_all,
                                        const Tensor& dw_xa_all, const Tensor& h_prev_rows,
                                        const Tensor& x_rows, Tensor& grad_x_cl, int64_t steps,
                                        int64_t batch, int64_t height, int64_t width) {
  const auto acc = acc_dtype(d_features_pre_all);
  const auto dtype = d_features_pre_all.scalar_type();
  grad_params[attention::kAttPwH] = steps_mm(d_features_pre_all, dw_ha_all, steps);
  grad_params[attention::kAttDwH] =
      depthwise_weight_grad(d_dwha_all, h_prev_rows, params[attention::kAttDwH], height, width,
                            steps);
  grad_params[attention::kAttBias] = d_features_pre_all.sum({0}, false, acc).to(dtype);
  grad_params[attention::kAttPwX] = steps_mm(d_features_pre_all, dw_xa_all, steps);
  const Tensor d_dwxa = at::mm(d_features_pre_all, params[attention::kAttPwX]);
  grad_params[attention::kAttDwX] =
      depthwise_weight_grad(d_dwxa, x_rows, params[attention::kAttDwX], height, width, steps);
  depthwise_transpose(d_dwxa, params[attention::kAttDwX], steps * batch, height, width,
                      grad_x_cl, grad_x_cl);
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast
