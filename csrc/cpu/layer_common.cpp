// Helpers shared by the CPU layer kernels (see layer_common.h).
#include "cpu/layer_common.h"

#include <cstring>

namespace convlstm_fast {
namespace cpu {
namespace {

std::string shape_string(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

void check_tensor(const std::string& op, const std::string& name, const at::Tensor& t,
                  at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_string(shape),
              ", got ", shape_string(t.sizes()));
}

// check_forward's checks, with `op` naming the op in messages; returns K.
int64_t check_layer_inputs(const std::string& op, const at::Tensor& x, const at::Tensor& h0,
                           const at::Tensor& c0, at::TensorList params,
                           cells::NamedShapes parameters, int kernel_index,
                           int64_t gate_activation) {
  TORCH_CHECK(params.size() == parameters.size, op, ": params must hold ", parameters.size,
              " tensors, got ", params.size());
  const at::Tensor& kernel_weight = params[kernel_index];
  TORCH_CHECK(kernel_weight.defined() && kernel_weight.dim() == 4, op, ": params[", kernel_index,
              "] must be a 4-D [*, *, K, K] weight");
  const int64_t k = kernel_weight.size(-1);
  TORCH_CHECK(k > 0 && k % 2 == 1, op, ": the kernel size must be a positive odd integer, got ",
              k);
  TORCH_CHECK(x.defined() && x.dim() == 5, op, ": x must be a 5-D tensor [T, B, Cin, H, W], got ",
              x.defined() ? x.dim() : 0, "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(h0.defined() && h0.dim() == 4, op, ": h0 must be a 4-D tensor [B, C, H, W]");
  const int64_t batch = x.size(1), hidden = h0.size(1);
  const std::vector<int64_t> state{batch, hidden, x.size(3), x.size(4)};
  check_tensor(op, "h0", h0, state, x);
  check_tensor(op, "c0", c0, state, x);
  const cells::Sizes sizes = cells::layer_sizes(x, h0, k);
  for (size_t i = 0; i < parameters.size; ++i) {
    check_tensor(op, "params[" + std::to_string(i) + "] (" + std::string(parameters[i].name) + ")",
                 params[i], cells::shape_of(parameters[i], sizes), x);
  }
  TORCH_CHECK(gate_activation == kSigmoid || gate_activation == kHardSigmoid, op,
              ": gate_activation must be 0 (sigmoid) or 1 (hard_sigmoid), got ", gate_activation);
  return k;
}

// check_backward's own checks.
void check_backward_inputs(const std::string& op, const at::Tensor& grad_output,
                           const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                           const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                           at::TensorList saved,
                           const std::vector<std::vector<int64_t>>& saved_shapes) {
  const std::vector<int64_t> out_shape{x.size(0), x.size(1), h0.size(1), x.size(3), x.size(4)};
  check_tensor(op, "output", output, out_shape, x);
  check_tensor(op, "grad_output", grad_output, out_shape, x);
  check_tensor(op, "grad_h_n", grad_h_n, h0.sizes(), x);
  check_tensor(op, "grad_c_n", grad_c_n, h0.sizes(), x);
  TORCH_CHECK(saved.size() == saved_shapes.size(), op, ": saved must hold ", saved_shapes.size(),
              " tensors (from the forward op), got ", saved.size());
  for (size_t i = 0; i < saved_shapes.size(); ++i) {
    check_tensor(op, "saved[" + std::to_string(i) + "]", saved[i], saved_shapes[i], x);
  }
}

// Nothing to compute: T, B, C, H·W or Cin is 0.
bool nothing_to_compute(const at::Tensor& x, const at::Tensor& h0) {
  return x.size(0) == 0 || x.size(1) * x.size(3) * x.size(4) * h0.size(1) == 0 || x.size(2) == 0;
}

}  // namespace

LayerCall check_forward(const cells::Cell& cell, int kernel_index, const at::Tensor& x,
                        const at::Tensor& h0, const at::Tensor& c0, at::TensorList params,
                        int64_t gate_activation) {
  const int64_t k = check_layer_inputs(std::string(cell.op), x, h0, c0, params, cell.parameters,
                                       kernel_index, gate_activation);
  return {k, cells::shapes_of(cell.saved_cpu, cells::layer_sizes(x, h0, k)),
          nothing_to_compute(x, h0)};
}

LayerCall check_backward(const cells::Cell& cell, int kernel_index, const at::Tensor& grad_output,
                         const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                         const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                         at::TensorList params, const at::Tensor& output, at::TensorList saved,
                         int64_t gate_activation) {
  const std::string op = std::string(cell.op) + "_backward";
  const int64_t k =
      check_layer_inputs(op, x, h0, c0, params, cell.parameters, kernel_index, gate_activation);
  LayerCall call{k, cells::shapes_of(cell.saved_cpu, cells::layer_sizes(x, h0, k)),
                 nothing_to_compute(x, h0)};
  check_backward_inputs(op, grad_output, grad_h_n, grad_c_n, x, h0, output, saved,
                        call.saved_shapes);
  return call;
}

LayerResult empty_layer_result(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const std::vector<std::vector<int64_t>>& saved_shapes) {
  std::vector<at::Tensor> saved;
  for (const auto& shape : saved_shapes) saved.push_back(at::zeros(shape, x.options()));
  at::Tensor output = at::zeros({x.size(0), x.size(1), h0.size(1), x.size(3), x.size(4)},
                                x.options());
  return {output, h0.clone(), c0.clone(), saved};
}

LayerResult empty_layer_grads(const at::Tensor& x, const at::Tensor& grad_h_n,
                              const at::Tensor& grad_c_n, at::TensorList params) {
  std::vector<at::Tensor> grad_params;
  for (const auto& p : params) grad_params.push_back(at::zeros_like(p));
  return {at::zeros(x.sizes(), x.options()), grad_h_n.clone(), grad_c_n.clone(), grad_params};
}

namespace {

// Tiles [first, last) of out[s, j, i] = in[s, i, j] (in [n, rows, cols], contiguous), in square
// tiles of one 64-byte line per row: a full tile is read a line at a time into a local block
// and written back a line at a time from its columns, so every memory access is a whole line
// (a plain strided loop touches one line per element on one side, and at power-of-two strides
// those lines fight over a few cache sets).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void transpose_tile_range(const scalar_t* __restrict__ in,
                                                    scalar_t* __restrict__ out, int64_t first,
                                                    int64_t last, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 64 / sizeof(scalar_t);
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  alignas(64) scalar_t block[kTile][kTile];
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t sample = tile / (row_tiles * col_tiles);
    const int64_t i0 = (tile / col_tiles) % row_tiles * kTile, j0 = tile % col_tiles * kTile;
    const scalar_t* src = in + sample * rows * cols;
    scalar_t* dst = out + sample * rows * cols;
    if (i0 + kTile <= rows && j0 + kTile <= cols) {
      for (int64_t i = 0; i < kTile; ++i) {
        for (int64_t j = 0; j < kTile; ++j) block[j][i] = src[(i0 + i) * cols + j0 + j];
      }
      for (int64_t j = 0; j < kTile; ++j) {
        for (int64_t i = 0; i < kTile; ++i) dst[(j0 + j) * rows + i0 + i] = block[j][i];
      }
    } else {
      const int64_t i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
      }
    }
  }
}

template <typename scalar_t>
void transpose_tiles(const scalar_t* in, scalar_t* out, int64_t n, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 64 / sizeof(scalar_t);
  const int64_t tiles = n * ((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
  at::parallel_for(0, tiles, 16, [=](int64_t first, int64_t last) {
    transpose_tile_range(in, out, first, last, rows, cols);
  });
}

// dst [n, cols, rows] = src [n, rows, cols]ᵀ when both are contiguous (the tiled loop), else
// ATen's strided copy.
void transpose_copy(const at::Tensor& dst, const at::Tensor& src, int64_t n, int64_t rows,
                    int64_t cols, const at::Tensor& dst_view_of_src) {
  if (src.is_contiguous() && dst.is_contiguous() && src.scalar_type() == dst.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "transpose_copy", [&] {
      transpose_tiles<scalar_t>(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), n, rows,
                                cols);
    });
  } else {
    dst.copy_(dst_view_of_src);
  }
}

}  // namespace

void copy_to_channels_last(const at::Tensor& dst, const at::Tensor& src) {
  transpose_copy(dst, src, src.size(0), src.size(1), src.size(2) * src.size(3),
                 src.permute({0, 2, 3, 1}));
}

void copy_from_channels_last(const at::Tensor& dst, const at::Tensor& src) {
  transpose_copy(dst, src, src.size(0), src.size(1) * src.size(2), src.size(3),
                 src.permute({0, 3, 1, 2}));
}

namespace {

// GCC vector types of 64 bytes: each multiversioned clone lowers them to its own ISA (one zmm
// register with AVX-512, two ymm with AVX2, four xmm with SSE2), so local accumulators of this
// type stay in registers where a local array would live on the stack.
template <typename scalar_t>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename V, typename scalar_t>
__attribute__((always_inline)) inline V load64(const scalar_t* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

}  // namespace

namespace {

// The planes are K×K stencils over small maps (28 wide here), whose rows are too short to
// vectorise well one at a time. So each plane is first copied into a zero-bordered buffer of
// width Wp = W + 2·(K/2); a tap is then one shift of that buffer, and the whole plane is a single
// flat loop of H·Wp elements per tap (the Wp − W extra columns of each output row are computed
// and dropped). The copies are plain loops inside the multiversioned functions (a memcpy call
// per 28-element row costs more than the row).
struct PaddedGeometry {
  int64_t height, width, k, pad, wp;
  PaddedGeometry(int64_t h, int64_t w, int64_t kernel)
      : height(h), width(w), k(kernel), pad(kernel / 2), wp(w + 2 * (kernel / 2)) {}
  // Elements of the zero-bordered buffer, plus 2·pad so that the last tap's reads stay inside.
  int64_t padded_size() const { return (height + 2 * pad) * wp + 2 * pad; }
  // Offset of tap (ky, kx) = ky·Wp + kx in the padded buffer, for every tap in order.
  std::vector<int64_t> tap_offsets() const {
    std::vector<int64_t> offsets;
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) offsets.push_back(ky * wp + kx);
    }
    return offsets;
  }
  int64_t flat_size() const { return height * wp; }
};

// Row copies of a few dozen elements: GCC would turn these loops into memcpy calls (costing more
// than the copy); kept as vectorised loops.
#define CONVLSTM_NO_MEMCPY_CALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))

// Copies plane [H, W] into the interior of `padded` (whose border the caller zeroed once).
template <typename scalar_t>
CONVLSTM_NO_MEMCPY_CALLS inline void load_padded(const PaddedGeometry& geo, const scalar_t* __restrict__ plane,
                        scalar_t* __restrict__ padded) {
  for (int64_t y = 0; y < geo.height; ++y) {
    scalar_t* dst = padded + (y + geo.pad) * geo.wp + geo.pad;
    const scalar_t* src = plane + y * geo.width;
    for (int64_t x = 0; x < geo.width; ++x) dst[x] = src[x];
  }
}

// out plane = init + Σ_taps w[tap] · (plane shifted by the tap), zero outside, or with
// `accumulate` out plane += that. Each 64-byte vector of an output row sums all the taps in a
// register and is stored once; a row's last vector overlaps the previous one when W is not a
// multiple of the vector width (the overlap is recomputed, not accumulated twice: the last
// vector's old values are read before the row's first store).
template <typename scalar_t>
CONVLSTM_NO_MEMCPY_CALLS CONVLSTM_CPU_MULTIVERSION void stencil_plane(
    const PaddedGeometry geo, const int64_t* __restrict__ tap_offsets,
    const scalar_t* __restrict__ plane, const scalar_t* __restrict__ w, scalar_t init,
    bool accumulate, scalar_t* __restrict__ padded, scalar_t* __restrict__ out) {
  using V = typename Vec64<scalar_t>::type;
  constexpr int64_t kLanes = 64 / sizeof(scalar_t);
  load_padded(geo, plane, padded);
  const int64_t taps = geo.k * geo.k;
  for (int64_t y = 0; y < geo.height; ++y) {
    const scalar_t* rows = padded + y * geo.wp;  // tap (ky, kx) reads rows + ky·Wp + kx + x
    scalar_t* o = out + y * geo.width;
    if (geo.width >= kLanes) {
      const V tail = accumulate ? load64<V>(o + geo.width - kLanes) : V{};
      for (int64_t x0 = 0; x0 < geo.width; x0 += kLanes) {
        const bool last = x0 + kLanes >= geo.width;
        const int64_t x = std::min(x0, geo.width - kLanes);
        V acc = (accumulate ? (last ? tail : load64<V>(o + x)) : V{}) + init;
        for (int64_t tap = 0; tap < taps; ++tap) {
          acc += w[tap] * load64<V>(rows + tap_offsets[tap] + x);
        }
        std::memcpy(o + x, &acc, sizeof(V));
      }
    } else {
      for (int64_t x = 0; x < geo.width; ++x) {
        scalar_t acc = accumulate ? scalar_t(o[x] + init) : init;
        for (int64_t tap = 0; tap < taps; ++tap) acc += w[tap] * rows[tap_offsets[tap] + x];
        o[x] = acc;
      }
    }
  }
}

// dw[tap] += Σ_{y, x} g[y, x] · (plane shifted by the tap)[y, x], over the flat padded-width
// domain (g zero in the extra columns). For kTaps > 0 (K·K known at compile time) one 64-byte
// vector of g is loaded once and multiplied into kTaps register accumulators; kTaps = 0 is the
// general K, one tap at a time.
template <int64_t kTaps, typename scalar_t>
CONVLSTM_NO_MEMCPY_CALLS CONVLSTM_CPU_MULTIVERSION void stencil_weight_grad_plane(
    const PaddedGeometry geo, const int64_t* __restrict__ tap_offsets,
    const scalar_t* __restrict__ plane, const scalar_t* __restrict__ g_plane,
    scalar_t* __restrict__ padded, scalar_t* __restrict__ g, scalar_t* __restrict__ dw) {
  using V = typename Vec64<scalar_t>::type;
  constexpr int64_t kLanes = 64 / sizeof(scalar_t);
  load_padded(geo, plane, padded);
  for (int64_t y = 0; y < geo.height; ++y) {
    scalar_t* dst = g + y * geo.wp;
    const scalar_t* src = g_plane + y * geo.width;
    for (int64_t x = 0; x < geo.width; ++x) dst[x] = src[x];
  }
  const int64_t n = geo.flat_size(), vectorised = n / kLanes * kLanes;
  const int64_t taps = kTaps > 0 ? kTaps : geo.k * geo.k;
  if (kTaps > 0) {
    V acc[kTaps > 0 ? kTaps : 1] = {};
    for (int64_t i = 0; i < vectorised; i += kLanes) {
      const V gv = load64<V>(g + i);
      for (int64_t tap = 0; tap < kTaps; ++tap) {
        acc[tap] += gv * load64<V>(padded + tap_offsets[tap] + i);
      }
    }
    for (int64_t tap = 0; tap < kTaps; ++tap) {
      scalar_t total = 0;
      for (int64_t lane = 0; lane < kLanes; ++lane) total += acc[tap][lane];
      dw[tap] += total;
    }
  } else {
    for (int64_t tap = 0; tap < taps; ++tap) {
      const scalar_t* __restrict__ src = padded + tap_offsets[tap];
      scalar_t total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < vectorised; ++i) total += g[i] * src[i];
      dw[tap] += total;
    }
  }
  for (int64_t tap = 0; tap < taps; ++tap) {
    scalar_t total = 0;
    for (int64_t i = vectorised; i < n; ++i) total += g[i] * padded[tap_offsets[tap] + i];
    dw[tap] += total;
  }
}

template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION scalar_t plane_sum(const scalar_t* __restrict__ in, int64_t n) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = 0; e < n; ++e) acc += in[e];
  return acc;
}

}  // namespace

void depthwise_conv_planes(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                           bool transposed, const at::Tensor& init, bool accumulate) {
  RECORD_FUNCTION("convlstm_fast::depthwise_conv_planes", {});
  const int64_t n = out.size(0), channels = out.size(1), height = out.size(2),
                width = out.size(3), k = weight.size(-1);
  const bool broadcast = input.size(1) == 1 && channels != 1;
  // `out` may be a channel slice of a wider buffer (sepconv_pair_planes): its planes contiguous,
  // the samples out.stride(0) apart.
  TORCH_INTERNAL_ASSERT(input.is_contiguous() && input.dim() == 4 && out.dim() == 4 &&
                        out.stride(3) == 1 && out.stride(2) == width &&
                        out.stride(1) == height * width && input.size(0) == n &&
                        input.size(2) == height && input.size(3) == width &&
                        (broadcast || input.size(1) == channels) && weight.size(0) == channels);
  const at::Tensor taps =
      (transposed ? weight.flip({2, 3}) : weight).reshape({channels, k * k}).contiguous();
  const at::Tensor init_c = init.defined() ? init.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_conv_planes", [&] {
    const scalar_t* src = input.data_ptr<scalar_t>();
    const scalar_t* wt = taps.data_ptr<scalar_t>();
    const scalar_t* base = init_c.defined() ? init_c.data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t plane = height * width, sample_stride = out.stride(0);
    const PaddedGeometry geo(height, width, k);
    const std::vector<int64_t> offsets = geo.tap_offsets();
    at::parallel_for(0, n * channels, 4, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> padded(geo.padded_size(), scalar_t(0));
      for (int64_t p = first; p < last; ++p) {
        const int64_t b = p / channels, c = p % channels;
        stencil_plane(geo, offsets.data(), src + (broadcast ? b : p) * plane, wt + c * k * k,
                      base ? base[p] : scalar_t(0), accumulate, padded.data(),
                      dst + b * sample_stride + c * plane);
      }
    });
  });
}

void depthwise_weight_grad_planes(const at::Tensor& grad_weight, const at::Tensor& grad_out,
                                  const at::Tensor& input) {
  RECORD_FUNCTION("convlstm_fast::depthwise_weight_grad_planes", {});
  const int64_t n = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3), k = grad_weight.size(-1);
  const bool broadcast = grad_out.size(1) == 1 && channels != 1;
  TORCH_INTERNAL_ASSERT(input.is_contiguous() && grad_out.is_contiguous() &&
                        grad_weight.is_contiguous() && grad_out.dim() == 4 &&
                        grad_out.size(0) == n && grad_out.size(2) == height &&
                        grad_out.size(3) == width && (broadcast || grad_out.size(1) == channels));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_weight_grad_planes", [&] {
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* dw = grad_weight.data_ptr<scalar_t>();
    const int64_t plane = height * width;
    const PaddedGeometry geo(height, width, k);
    const std::vector<int64_t> offsets = geo.tap_offsets();
    at::parallel_for(0, channels, 4, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> padded(geo.padded_size(), scalar_t(0));
      std::vector<scalar_t> grad(geo.flat_size(), scalar_t(0));
      for (int64_t c = first; c < last; ++c) {
        for (int64_t sample = 0; sample < n; ++sample) {
          const int64_t offset = (sample * channels + c) * plane;
          const int64_t grad_offset = broadcast ? sample * plane : offset;
          const auto args = std::make_tuple(geo, offsets.data(), in + offset, g + grad_offset,
                                            padded.data(), grad.data(), dw + c * k * k);
          if (k == 3) {
            std::apply(stencil_weight_grad_plane<9, scalar_t>, args);
          } else if (k == 5) {
            std::apply(stencil_weight_grad_plane<25, scalar_t>, args);
          } else {
            std::apply(stencil_weight_grad_plane<0, scalar_t>, args);
          }
        }
      }
    });
  });
}

// One batched product with the weight broadcast over the samples: ATen's CPU bmm gives each
// thread whole samples, measured ~11 % faster here than one multithreaded GEMM per sample.
void pointwise_planes(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& in,
                      bool accumulate) {
  const int64_t batch = in.size(0);
  at::Tensor out_planes = out.view({batch, out.size(1), -1});
  out_planes.baddbmm_(weight.expand({batch, weight.size(0), weight.size(1)}),
                      in.view({batch, in.size(1), -1}), accumulate ? 1 : 0, 1);
}

void pointwise_planes_weight_grad(const at::Tensor& grad_weight, const at::Tensor& grad_out,
                                  const at::Tensor& in) {
  const int64_t batch = in.size(0);
  for (int64_t b = 0; b < batch; ++b) {
    grad_weight.addmm_(grad_out[b].view({grad_out.size(1), -1}),
                       in[b].view({in.size(1), -1}).t());
  }
}

void plane_means(const at::Tensor& out, const at::Tensor& input) {
  RECORD_FUNCTION("convlstm_fast::plane_means", {});
  TORCH_INTERNAL_ASSERT(input.is_contiguous() && out.is_contiguous() &&
                        out.numel() == input.size(0) * input.size(1));
  const int64_t planes = input.size(0) * input.size(1), plane = input.size(2) * input.size(3);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "plane_means", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 64, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        o[p] = plane_sum(in + p * plane, plane) / scalar_t(plane);
      }
    });
  });
}

void small_addmm_(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight,
                  bool transpose) {
  const at::Tensor a = in.contiguous(), w = weight.contiguous();
  const int64_t rows = a.size(0), inner = a.size(1), cols = transpose ? w.size(0) : w.size(1);
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.size(0) == rows && out.size(1) == cols &&
                        w.size(transpose ? 1 : 0) == inner);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "small_addmm_", [&] {
    if (transpose) {
      small_matmul_t_accumulate<scalar_t>(rows, inner, cols, a.data_ptr<scalar_t>(),
                                          w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    } else {
      small_matmul_accumulate<scalar_t>(rows, inner, cols, a.data_ptr<scalar_t>(),
                                        w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    }
  });
}

}  // namespace cpu
}  // namespace convlstm_fast
