// The native cells: for each op, everything in C++ that depends on which cell it computes, declared
// once and shared by the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and the schemas
// (csrc/convlstm_fast.cpp, which declares one op triple per entry of kCells):
//   - the parameters, in op order, by SPEC name, with their shapes as functions of (Cin, C, K);
//   - the gate slots in op order (per element for convlstm, the pooled gates for a, b, c, d);
//   - what each backend's forward saves for its backward, by name, with shapes in (T, B, C, H, W).
// Kernels name parameters and saved tensors only through the constants below (kGateWeightX, ...,
// kSavedCell, ...), which are looked up by name in these lists at compile time: a list's order is
// the one place where the op order is written down.
//
// The registry (convlstm_fast/registry.py: CellSpec.parameters, .gates, .kernels and .saved)
// describes the same; Python cannot include a header, so the op convlstm_fast::cell_layout
// (convlstm_fast.cpp) evaluates these lists and tests/test_native_layout.py holds the two equal.
// A native cell is its registry entry, its entry here, and one kernel file per backend.
//
// Attention letters (shared/SPEC.md, registry.py): the features F = tanh(SepConv_xa(X_t) +
// SepConv_ha(H_{t−1}) + b_a), the logits Z (b: W_z * F, one channel; c/d: SepConv_z(F)) and the
// map A (b: softmax of Z over H·W; c/d: exp(Z − max_HW Z)).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <utility>
#include <vector>

namespace convlstm_fast {
namespace cells {

// The sizes shapes are written in: Cin, C, K of the layer and T, B, H, W of the sequence.
enum class Size : int { kOne, kCin, kC, kK, kT, kB, kH, kW };

// One dimension of a shape: factor · size (4C is {4, Size::kC}).
struct Dim {
  int64_t factor = 1;
  Size size = Size::kOne;
};

constexpr Dim operator*(int64_t factor, Dim dim) { return {factor * dim.factor, dim.size}; }

// The symbols the lists below write shapes in, as SPEC.md writes them.
namespace symbols {
constexpr Dim One{1, Size::kOne}, Cin{1, Size::kCin}, C{1, Size::kC}, K{1, Size::kK},
    T{1, Size::kT}, B{1, Size::kB}, H{1, Size::kH}, W{1, Size::kW};
}  // namespace symbols

// A cell's named tensor (a parameter, or a tensor saved for backward) and its shape.
struct NamedShape {
  std::string_view name;
  std::array<Dim, 5> dims{};
  int rank = 0;

  constexpr NamedShape(std::string_view name_, std::initializer_list<Dim> dims_)
      : name(name_), rank(static_cast<int>(dims_.size())) {
    int d = 0;
    for (const Dim& dim : dims_) dims[d++] = dim;
  }
};

template <size_t N>
using NamedShapeList = std::array<NamedShape, N>;

// A view of one of the lists, for code that serves several cells.
struct NamedShapes {
  const NamedShape* items;
  size_t size;

  template <size_t N>
  constexpr NamedShapes(const NamedShapeList<N>& list) : items(list.data()), size(N) {}
  constexpr const NamedShape& operator[](size_t index) const { return items[index]; }
  constexpr const NamedShape* begin() const { return items; }
  constexpr const NamedShape* end() const { return items + size; }
};

// The lists a and b one after the other (b, c, d extend a's parameters).
template <size_t N, size_t M, size_t... I, size_t... J>
constexpr NamedShapeList<N + M> concat_lists(const NamedShapeList<N>& a, const NamedShapeList<M>& b,
                                             std::index_sequence<I...>,
                                             std::index_sequence<J...>) {
  return {{a[I]..., b[J]...}};
}

template <size_t N, size_t M>
constexpr NamedShapeList<N + M> concat(const NamedShapeList<N>& a, const NamedShapeList<M>& b) {
  return concat_lists(a, b, std::make_index_sequence<N>(), std::make_index_sequence<M>());
}

// The index of `name` in `list`; a name the list lacks is a compile error where a constant is
// needed (the throw is not a constant expression).
template <size_t N>
constexpr int index_of(const NamedShapeList<N>& list, std::string_view name) {
  for (size_t i = 0; i < N; ++i) {
    if (list[i].name == name) return static_cast<int>(i);
  }
  throw "convlstm_fast cells.h: no tensor of that name in the list";
}

// Whether `list` starts with the names of `prefix`, in its order.
template <size_t N, size_t M>
constexpr bool starts_with(const NamedShapeList<N>& list, const NamedShapeList<M>& prefix) {
  if (M > N) return false;
  for (size_t i = 0; i < M; ++i) {
    if (list[i].name != prefix[i].name) return false;
  }
  return true;
}

// The gate a channel-attention map A replaces (cells c and d), as an index into (i, f, o).
enum MapGate : int { kNoMapGate = -1, kMapIsInputGate = 0, kMapIsOutputGate = 2 };

// One native op: its cell's parameters, gates and saved tensors.
struct Cell {
  std::string_view op;
  // The gate slots in op order, one letter each (the registry's gates.order).
  std::string_view gates;
  NamedShapes parameters;
  // What the CPU and the CUDA kernel save (the registry's saved[kernels["cpu"]] and
  // saved[kernels["cuda"]]), all in x's dtype.
  NamedShapes saved_cpu;
  NamedShapes saved_cuda;

  // Which of i, f, o the map A replaces: the one a two-gate pooled cell lacks (c: i, d: o).
  constexpr MapGate map_gate() const {
    if (gates.size() != 2) return kNoMapGate;
    return gates.find('i') == std::string_view::npos ? kMapIsInputGate
           : gates.find('o') == std::string_view::npos ? kMapIsOutputGate
                                                      : kNoMapGate;
  }
};

// ---- convlstm_layer: the original ConvLSTM (SPEC.md "convlstm") ------------------------------
namespace convlstm {
using namespace symbols;
// [i f g o] = W_x * X_t + W_h * H_{t−1} + b
inline constexpr NamedShapeList<3> kParameters{{
    {"weight_x", {4 * C, Cin, K, K}},
    {"weight_h", {4 * C, C, K, K}},
    {"bias", {4 * C}},
}};
inline constexpr int kWeightX = index_of(kParameters, "weight_x");
inline constexpr int kWeightH = index_of(kParameters, "weight_h");
inline constexpr int kBias = index_of(kParameters, "bias");
// Saved by both backends, channels-last: C_t and the gate pre-activations (i, f, g, o).
inline constexpr NamedShapeList<2> kSaved{{
    {"cell", {T, B, H, W, C}},
    {"gate_preact", {T, B, H, W, 4 * C}},
}};
inline constexpr int kSavedCell = index_of(kSaved, "cell");
inline constexpr int kSavedGatePreact = index_of(kSaved, "gate_preact");
}  // namespace convlstm

// ---- what every pooled cell (a, b, c, d) shares ----------------------------------------------
namespace pooled {
using namespace symbols;
// x̄ = GAP(X_t), h̄ = GAP(H_{t−1}); pooled gates σ(U_x x̄ + U_h h̄ + b_g), `gates` of them;
// G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c).
constexpr NamedShapeList<8> parameters(int64_t gates) {
  return {{
      {"gate_weight_x", {gates * C, Cin}},
      {"gate_weight_h", {gates * C, C}},
      {"gate_bias", {gates * C}},
      {"cand_dw_x", {Cin, One, K, K}},
      {"cand_pw_x", {C, Cin}},
      {"cand_dw_h", {C, One, K, K}},
      {"cand_pw_h", {C, C}},
      {"cand_bias", {C}},
  }};
}
// The indices every pooled cell shares (each one's list starts with these, checked below).
inline constexpr int kGateWeightX = index_of(parameters(3), "gate_weight_x");
inline constexpr int kGateWeightH = index_of(parameters(3), "gate_weight_h");
inline constexpr int kGateBias = index_of(parameters(3), "gate_bias");
inline constexpr int kCandDwX = index_of(parameters(3), "cand_dw_x");
inline constexpr int kCandPwX = index_of(parameters(3), "cand_pw_x");
inline constexpr int kCandDwH = index_of(parameters(3), "cand_dw_h");
inline constexpr int kCandPwH = index_of(parameters(3), "cand_pw_h");
inline constexpr int kCandBias = index_of(parameters(3), "cand_bias");

// Saved: C_t and G of every step (state tensors: [T, B, C, H, W] on the CPU, which keeps the
// op's NCHW, [T, B, H, W, C] on CUDA) and the pooled gates' pre-activations [T, B, gates·C].
enum class Layout { kNchw, kChannelsLast };
constexpr NamedShape state(std::string_view name, Layout layout) {
  return layout == Layout::kNchw ? NamedShape(name, {T, B, C, H, W})
                                 : NamedShape(name, {T, B, H, W, C});
}
constexpr NamedShapeList<3> saved(int64_t gates, Layout layout) {
  return {{state("cell", layout), state("candidate", layout),
           {"gate_preact", {T, B, gates * C}}}};
}
inline constexpr int kSavedCell = index_of(saved(3, Layout::kNchw), "cell");
inline constexpr int kSavedCandidate = index_of(saved(3, Layout::kNchw), "candidate");
inline constexpr int kSavedGatePreact = index_of(saved(3, Layout::kNchw), "gate_preact");
inline constexpr size_t kSavedCount = saved(3, Layout::kNchw).size();

// The attention features F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a) of b, c, d.
inline constexpr NamedShapeList<5> kFeatureParameters{{
    {"att_dw_x", {Cin, One, K, K}},
    {"att_pw_x", {C, Cin}},
    {"att_dw_h", {C, One, K, K}},
    {"att_pw_h", {C, C}},
    {"att_bias", {C}},
}};
}  // namespace pooled

// ---- pooled_layer: cell a (SPEC.md "a") ------------------------------------------------------
namespace pooled_layer {
inline constexpr auto kParameters = pooled::parameters(3);  // gates i, f, o
inline constexpr auto kSavedNchw = pooled::saved(3, pooled::Layout::kNchw);
inline constexpr auto kSavedChannelsLast = pooled::saved(3, pooled::Layout::kChannelsLast);
}  // namespace pooled_layer

// ---- spatial_attention_layer: cell b (SPEC.md "b") -------------------------------------------
namespace spatial_attention {
using namespace symbols;
// a's parameters (gates i, f, o), F's, and Z = W_z * F (a K×K conv from C channels to one).
inline constexpr auto kParameters =
    concat(concat(pooled::parameters(3), pooled::kFeatureParameters),
           NamedShapeList<1>{{{"att_weight_z", {One, C, K, K}}}});
inline constexpr int kAttWeightZ = index_of(kParameters, "att_weight_z");
// Saved: a's, then the map A = softmax_HW(Z) [T, B, H, W] (one channel, either layout).
constexpr auto saved(pooled::Layout layout) {
  return concat(pooled::saved(3, layout), NamedShapeList<1>{{{"map", {T, B, H, W}}}});
}
inline constexpr auto kSavedNchw = saved(pooled::Layout::kNchw);
inline constexpr auto kSavedChannelsLast = saved(pooled::Layout::kChannelsLast);
inline constexpr int kSavedMap = index_of(kSavedNchw, "map");
}  // namespace spatial_attention

// ---- input_attention_layer, output_attention_layer: cells c, d (SPEC.md "c", "d") ------------
// One layout for both: the map A = exp(Z − max_HW Z) replaces the input gate (c: pooled gates
// f, o) or the output gate (d: i, f).
namespace channel_attention {
using namespace symbols;
// a's parameters (two gates), F's, and Z = SepConv_z(F).
inline constexpr auto kParameters =
    concat(concat(pooled::parameters(2), pooled::kFeatureParameters),
           NamedShapeList<2>{{{"att_dw_z", {C, One, K, K}}, {"att_pw_z", {C, C}}}});
inline constexpr int kAttDwZ = index_of(kParameters, "att_dw_z");
inline constexpr int kAttPwZ = index_of(kParameters, "att_pw_z");
// Saved: a's (two pooled gates), then the map A, a state tensor.
constexpr auto saved(pooled::Layout layout) {
  return concat(pooled::saved(2, layout), NamedShapeList<1>{{pooled::state("map", layout)}});
}
inline constexpr auto kSavedNchw = saved(pooled::Layout::kNchw);
inline constexpr auto kSavedChannelsLast = saved(pooled::Layout::kChannelsLast);
inline constexpr int kSavedMap = index_of(kSavedNchw, "map");
}  // namespace channel_attention

// The indices of F's parameters, the same in b, c and d (right after a's, checked below).
namespace attention {
inline constexpr int kAttDwX = index_of(spatial_attention::kParameters, "att_dw_x");
inline constexpr int kAttPwX = index_of(spatial_attention::kParameters, "att_pw_x");
inline constexpr int kAttDwH = index_of(spatial_attention::kParameters, "att_dw_h");
inline constexpr int kAttPwH = index_of(spatial_attention::kParameters, "att_pw_h");
inline constexpr int kAttBias = index_of(spatial_attention::kParameters, "att_bias");
}  // namespace attention

// The pooled cells' shared constants hold in each of them.
static_assert(starts_with(spatial_attention::kParameters, pooled_layer::kParameters) &&
              starts_with(channel_attention::kParameters, pooled::parameters(2)));
static_assert(starts_with(spatial_attention::kSavedNchw, pooled_layer::kSavedNchw) &&
              starts_with(spatial_attention::kSavedChannelsLast,
                          pooled_layer::kSavedChannelsLast) &&
              starts_with(channel_attention::kSavedNchw, pooled::saved(2, pooled::Layout::kNchw)) &&
              starts_with(channel_attention::kSavedChannelsLast,
                          pooled::saved(2, pooled::Layout::kChannelsLast)));
static_assert(index_of(channel_attention::kParameters, "att_dw_x") == attention::kAttDwX &&
              index_of(channel_attention::kParameters, "att_pw_x") == attention::kAttPwX &&
              index_of(channel_attention::kParameters, "att_dw_h") == attention::kAttDwH &&
              index_of(channel_attention::kParameters, "att_pw_h") == attention::kAttPwH &&
              index_of(channel_attention::kParameters, "att_bias") == attention::kAttBias);
static_assert(index_of(pooled::saved(3, pooled::Layout::kChannelsLast), "gate_preact") ==
                  pooled::kSavedGatePreact &&
              index_of(pooled::saved(2, pooled::Layout::kNchw), "gate_preact") ==
                  pooled::kSavedGatePreact);

// ---- the native ops, in the registry's order --------------------------------------------------
inline constexpr Cell kConvLSTMLayer{"convlstm_layer", "ifgo", convlstm::kParameters,
                                     convlstm::kSaved, convlstm::kSaved};
inline constexpr Cell kPooledLayer{"pooled_layer", "ifo", pooled_layer::kParameters,
                                   pooled_layer::kSavedNchw, pooled_layer::kSavedChannelsLast};
inline constexpr Cell kSpatialAttentionLayer{
    "spatial_attention_layer", "ifo", spatial_attention::kParameters,
    spatial_attention::kSavedNchw, spatial_attention::kSavedChannelsLast};
inline constexpr Cell kInputAttentionLayer{
    "input_attention_layer", "fo", channel_attention::kParameters,
    channel_attention::kSavedNchw, channel_attention::kSavedChannelsLast};
inline constexpr Cell kOutputAttentionLayer{
    "output_attention_layer", "if", channel_attention::kParameters,
    channel_attention::kSavedNchw, channel_attention::kSavedChannelsLast};
inline constexpr std::array<const Cell*, 5> kCells{
    {&kConvLSTMLayer, &kPooledLayer, &kSpatialAttentionLayer, &kInputAttentionLayer,
     &kOutputAttentionLayer}};

// A pooled cell's gate FCs have one block of C rows per pooled gate.
constexpr bool gate_rows_match(const Cell& cell) {
  return cell.parameters[pooled::kGateWeightX].dims[0].factor ==
         static_cast<int64_t>(cell.gates.size());
}
static_assert(gate_rows_match(kPooledLayer) && gate_rows_match(kSpatialAttentionLayer) &&
              gate_rows_match(kInputAttentionLayer) && gate_rows_match(kOutputAttentionLayer));
static_assert(kPooledLayer.map_gate() == kNoMapGate &&
              kSpatialAttentionLayer.map_gate() == kNoMapGate &&
              kInputAttentionLayer.map_gate() == kMapIsInputGate &&
              kOutputAttentionLayer.map_gate() == kMapIsOutputGate);

// ---- shapes at given sizes -------------------------------------------------------------------

// The sizes of one layer call.
struct Sizes {
  int64_t in_channels = 0, hidden_channels = 0, kernel_size = 0;
  int64_t steps = 0, batch = 0, height = 0, width = 0;
};

// The sizes of a call with x [T, B, Cin, H, W], h0 [B, C, H, W] and kernel size K.
inline Sizes layer_sizes(const at::Tensor& x, const at::Tensor& h0, int64_t kernel_size) {
  return {x.size(2), h0.size(1), kernel_size, x.size(0), x.size(1), x.size(3), x.size(4)};
}

inline int64_t evaluate(Dim dim, const Sizes& sizes) {
  switch (dim.size) {
    case Size::kCin: return dim.factor * sizes.in_channels;
    case Size::kC: return dim.factor * sizes.hidden_channels;
    case Size::kK: return dim.factor * sizes.kernel_size;
    case Size::kT: return dim.factor * sizes.steps;
    case Size::kB: return dim.factor * sizes.batch;
    case Size::kH: return dim.factor * sizes.height;
    case Size::kW: return dim.factor * sizes.width;
    case Size::kOne: break;
  }
  return dim.factor;
}

inline std::vector<int64_t> shape_of(const NamedShape& tensor, const Sizes& sizes) {
  std::vector<int64_t> shape;
  for (int d = 0; d < tensor.rank; ++d) shape.push_back(evaluate(tensor.dims[d], sizes));
  return shape;
}

inline std::vector<std::vector<int64_t>> shapes_of(NamedShapes list, const Sizes& sizes) {
  std::vector<std::vector<int64_t>> shapes;
  for (const NamedShape& tensor : list) shapes.push_back(shape_of(tensor, sizes));
  return shapes;
}

// A checked call of a cell's op (check_forward, check_backward of csrc/cpu/layer_common.h and
// csrc/cuda/layer_common.cuh): K, the shapes of what the forward saves on that backend, and
// whether there is nothing to compute.
struct LayerCall {
  int64_t kernel_size;
  std::vector<std::vector<int64_t>> saved_shapes;
  bool empty;
};

// The order a layer walks its steps: t = 0 … T − 1, or T − 1 … 0 with `reverse` (the reverse
// direction of a bidirectional layer, inside the kernel's own loop). Every per-step tensor — x,
// the output, the saved tensors, the gradients — is indexed by time t in either order; only the
// loop, the previous step and the first and last steps change: step t's state comes from step
// prev(t) (h0/c0 at the first step), and h_n, c_n are the last step's.
struct Walk {
  int64_t steps;
  bool reverse;
  // The time of the s-th step walked, s = 0 … T − 1.
  int64_t time(int64_t s) const { return reverse ? steps - 1 - s : s; }
  int64_t first() const { return time(0); }
  int64_t last() const { return time(steps - 1); }
  bool is_first(int64_t t) const { return t == first(); }
  bool is_last(int64_t t) const { return t == last(); }
  // The step before t in the walk (valid unless is_first(t)), and the one after (unless
  // is_last(t)).
  int64_t prev(int64_t t) const { return reverse ? t + 1 : t - 1; }
  int64_t next(int64_t t) const { return reverse ? t - 1 : t + 1; }
};

}  // namespace cells
}  // namespace convlstm_fast
