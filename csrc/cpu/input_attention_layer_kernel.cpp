// Variant (c), `convlstm_fast::input_attention_layer` and its backward, on the CPU (shared/SPEC.md
// "c"): the channel-attention cell of channel_attention.h with the map A = exp(Z − max_HW Z)
// as the input gate i:
//   c: i = A, [f o] = σ(U_x x̄ + U_h h̄ + b_g)
#include "cpu/channel_attention.h"

namespace convlstm_fast {
namespace cpu {

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  register_layer_kernels<channel_attention_forward<cells::kInputAttentionLayer>>(
      m, cells::kInputAttentionLayer, &channel_attention_backward<cells::kInputAttentionLayer>);
}

}  // namespace cpu
}  // namespace convlstm_fast
