// Winograd F(2×2, 3×3) convolution for the original ConvLSTM's 3×3 'same' convolutions
// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//
// Each 2×2 output tile is computed from a 4×4 input tile with 16 multiplications per (input
// channel, output channel) pair instead of 36: the input tiles d and the 3×3 kernels g are
// transformed (V = Bᵀ d B, U = G g Gᵀ), multiplied element-wise over the 16 positions — 16 GEMMs
// [Cout, Cin] × [Cin, tiles] — and transformed back (Y = Aᵀ M A). The cell's convolutions are
// compute-bound at the machine's full matmul rate (shared/KERNELS.md), so 2.25× fewer
// multiply-adds is the one lever left; the transforms are a few memory passes.
#include "cpu/layer_common.h"

namespace convlstm_fast {
namespace cpu {
namespace {

// The F(2, 3) kernel transform matrix G [4, 3].
at::Tensor g_matrix(const at::TensorOptions& options) {
  return at::tensor(std::vector<double>{1, 0, 0, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0, 0, 1},
                    at::TensorOptions().dtype(at::kDouble))
      .view({4, 3})
      .to(options);
}

// The transforms walk rows of tiles: row = (channel, sample, tile row ty), with P = N·th·tw tiles
// per channel in the [16, C, P] transform buffers.
struct TileGrid {
  int64_t n, channels, th, tw;
  int64_t tiles() const { return n * th * tw; }
  // Offset of the row's first tile in one of the 16 planes of a [16, C, P] buffer.
  int64_t tile_offset(int64_t row) const {
    return row / (n * th) * tiles() + row % (n * th) * tw;
  }
  // Offset of the row's first map row (2·ty) in an NCHW tensor of `height` × `width` planes.
  int64_t map_offset(int64_t row, int64_t height, int64_t width) const {
    const int64_t c = row / (n * th), b = row % (n * th) / th, ty = row % th;
    return ((b * channels + c) * height + 2 * ty) * width;
  }
  int64_t tile_row(int64_t row) const { return row % th; }
};

// V = Bᵀ d B for the 4×4 tiles of rows [first, last) of (c, n, ty), written to
// v[(i·4 + j)·Cin·P + c·P + tile], P = N·th·tw tiles. Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void input_transform_rows(const TileGrid grid,
                                                    const scalar_t* __restrict__ padded,
                                                    scalar_t* __restrict__ v, int64_t first,
                                                    int64_t last, int64_t hp, int64_t wp) {
  const int64_t plane_stride = grid.channels * grid.tiles();
  for (int64_t row = first; row < last; ++row) {
    const scalar_t* src = padded + grid.map_offset(row, hp, wp);
    scalar_t* dst = v + grid.tile_offset(row);
    for (int64_t tx = 0; tx < grid.tw; ++tx) {
      scalar_t t[4][4];
      for (int64_t l = 0; l < 4; ++l) {
        const scalar_t d0 = src[2 * tx + l], d1 = src[wp + 2 * tx + l],
                       d2 = src[2 * wp + 2 * tx + l], d3 = src[3 * wp + 2 * tx + l];
        t[0][l] = d0 - d2;
        t[1][l] = d1 + d2;
        t[2][l] = d2 - d1;
        t[3][l] = d1 - d3;
      }
      for (int64_t i = 0; i < 4; ++i) {
        dst[(i * 4 + 0) * plane_stride + tx] = t[i][0] - t[i][2];
        dst[(i * 4 + 1) * plane_stride + tx] = t[i][1] + t[i][2];
        dst[(i * 4 + 2) * plane_stride + tx] = t[i][2] - t[i][1];
        dst[(i * 4 + 3) * plane_stride + tx] = t[i][1] - t[i][3];
      }
    }
  }
}

// Y = Aᵀ M A for rows [first, last) of (o, n, ty), M read from m[(i·4 + j)·Cout·P + o·P + tile],
// the 2×2 outputs written to out [N, Cout, H, W] where they fall inside the map.
// Aᵀ = [1 1 1 0; 0 1 −1 −1].
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void output_transform_rows(const TileGrid grid,
                                                     const scalar_t* __restrict__ m,
                                                     scalar_t* __restrict__ out, int64_t first,
                                                     int64_t last, int64_t height,
                                                     int64_t width) {
  const int64_t plane_stride = grid.channels * grid.tiles();
  for (int64_t row = first; row < last; ++row) {
    const scalar_t* src = m + grid.tile_offset(row);
    scalar_t* dst = out + grid.map_offset(row, height, width);
    const bool second_row = 2 * grid.tile_row(row) + 1 < height;
    for (int64_t tx = 0; tx < grid.tw; ++tx) {
      scalar_t t[2][4];
      for (int64_t j = 0; j < 4; ++j) {
        const scalar_t m0 = src[j * plane_stride + tx], m1 = src[(4 + j) * plane_stride + tx],
                       m2 = src[(8 + j) * plane_stride + tx],
                       m3 = src[(12 + j) * plane_stride + tx];
        t[0][j] = m0 + m1 + m2;
        t[1][j] = m1 - m2 - m3;
      }
      const bool second_col = 2 * tx + 1 < width;
      for (int64_t a = 0; a < 2; ++a) {
        if (a == 1 && !second_row) break;
        scalar_t* o_row = dst + a * width + 2 * tx;
        o_row[0] = t[a][0] + t[a][1] + t[a][2];
        if (second_col) o_row[1] = t[a][1] - t[a][2] - t[a][3];
      }
    }
  }
}

// The adjoint of output_transform_rows: for the 2×2 gradient block dY of each tile (zero where
// it falls outside the map), dM = A dY Aᵀ, written to m[(i·4 + j)·Cout·P + o·P + tile].
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void grad_transform_rows(const TileGrid grid,
                                                   const scalar_t* __restrict__ grad,
                                                   scalar_t* __restrict__ m, int64_t first,
                                                   int64_t last, int64_t height, int64_t width) {
  const int64_t plane_stride = grid.channels * grid.tiles();
  for (int64_t row = first; row < last; ++row) {
    const scalar_t* src = grad + grid.map_offset(row, height, width);
    scalar_t* dst = m + grid.tile_offset(row);
    const bool second_row = 2 * grid.tile_row(row) + 1 < height;
    for (int64_t tx = 0; tx < grid.tw; ++tx) {
      const bool second_col = 2 * tx + 1 < width;
      const scalar_t y00 = src[2 * tx], y01 = second_col ? src[2 * tx + 1] : scalar_t(0);
      const scalar_t y10 = second_row ? src[width + 2 * tx] : scalar_t(0);
      const scalar_t y11 = second_row && second_col ? src[width + 2 * tx + 1] : scalar_t(0);
      // s = A dY (rows i), then dM = s Aᵀ (columns j); A = (Aᵀ)ᵀ = [1 0; 1 1; 1 −1; 0 −1].
      const scalar_t s[4][2] = {{y00, y01}, {y00 + y10, y01 + y11}, {y00 - y10, y01 - y11},
                                {-y10, -y11}};
      for (int64_t i = 0; i < 4; ++i) {
        dst[(i * 4 + 0) * plane_stride + tx] = s[i][0];
        dst[(i * 4 + 1) * plane_stride + tx] = s[i][0] + s[i][1];
        dst[(i * 4 + 2) * plane_stride + tx] = s[i][0] - s[i][1];
        dst[(i * 4 + 3) * plane_stride + tx] = -s[i][1];
      }
    }
  }
}

}  // namespace

at::Tensor winograd_weight(const at::Tensor& weight) {
  TORCH_INTERNAL_ASSERT(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3);
  const at::Tensor g = g_matrix(weight.options());
  // U[i][j] = Σ_kl G[i,k] w[o,c,k,l] G[j,l] -> [16, Cout, Cin]
  return at::einsum("ik,ockl,jl->ijoc", {g, weight, g})
      .reshape({16, weight.size(0), weight.size(1)})
      .contiguous();
}

void winograd_input_transform(const at::Tensor& input, const at::Tensor& tiles_out) {
  const int64_t n = input.size(0), cin = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t th = (height + 1) / 2, tw = (width + 1) / 2;
  // Zero-pad by 1 (the 'same' padding) plus what makes whole 2×2 output tiles.
  const at::Tensor padded =
      at::constant_pad_nd(input, {1, 2 * tw + 1 - width, 1, 2 * th + 1 - height}, 0)
          .contiguous();
  const int64_t hp = padded.size(2), wp = padded.size(3);
  tiles_out.resize_({16, cin, n * th * tw});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "winograd_input_transform", [&] {
    const scalar_t* src = padded.data_ptr<scalar_t>();
    scalar_t* vp = tiles_out.data_ptr<scalar_t>();
    const TileGrid grid{n, cin, th, tw};
    at::parallel_for(0, cin * n * th, 16, [&](int64_t first, int64_t last) {
      input_transform_rows(grid, src, vp, first, last, hp, wp);
    });
  });
}

void winograd_grad_transform(const at::Tensor& grad_out, const at::Tensor& products_out) {
  const at::Tensor grad = grad_out.contiguous();
  const int64_t n = grad.size(0), cout = grad.size(1), height = grad.size(2),
                width = grad.size(3);
  const int64_t th = (height + 1) / 2, tw = (width + 1) / 2;
  products_out.resize_({16, cout, n * th * tw});
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "winograd_grad_transform", [&] {
    const scalar_t* src = grad.data_ptr<scalar_t>();
    scalar_t* mp = products_out.data_ptr<scalar_t>();
    const TileGrid grid{n, cout, th, tw};
    at::parallel_for(0, cout * n * th, 16, [&](int64_t first, int64_t last) {
      grad_transform_rows(grid, src, mp, first, last, height, width);
    });
  });
}

at::Tensor winograd_weight_grad(const at::Tensor& grad_transformed) {
  const at::Tensor g = g_matrix(grad_transformed.options());
  const int64_t cout = grad_transformed.size(1), cin = grad_transformed.size(2);
  // dw[o,c,k,l] = Σ_ij G[i,k] dU[i,j,o,c] G[j,l]
  return at::einsum("ik,ijoc,jl->ockl", {g, grad_transformed.view({4, 4, cout, cin}), g})
      .contiguous();
}

at::Tensor winograd_conv(const at::Tensor& input, const at::Tensor& transformed_weight,
                         WinogradBuffers& buffers) {
  RECORD_FUNCTION("convlstm_fast::winograd_conv", {});
  const int64_t n = input.size(0), height = input.size(2), width = input.size(3),
                cout = transformed_weight.size(1);
  const int64_t th = (height + 1) / 2, tw = (width + 1) / 2;
  // The transformed tiles and their products are several times the map's size: kept in
  // buffers the caller reuses across steps (fresh multi-MB allocations cost page faults).
  winograd_input_transform(input, buffers.tiles);
  buffers.products.resize_({16, cout, n * th * tw});
  at::bmm_out(buffers.products, transformed_weight, buffers.tiles);  // [16, Cout, P]
  const at::Tensor out = at::empty({n, cout, height, width}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "winograd_conv", [&] {
    const scalar_t* mp = buffers.products.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const TileGrid grid{n, cout, th, tw};
    at::parallel_for(0, cout * n * th, 16, [&](int64_t first, int64_t last) {
      output_transform_rows(grid, mp, op, first, last, height, width);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace convlstm_fast
