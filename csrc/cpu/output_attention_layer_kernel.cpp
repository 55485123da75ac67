// Variant (d), `convlstm_fast::output_attention_layer` and its backward, on the CPU (shared/SPEC.md
// "d"): the channel-attention cell of channel_attention.h with the map A = exp(Z − max_HW Z)
// as the output gate o:
//   d: o = A, [i f] = σ(U_x x̄ + U_h h̄ + b_g)
#include "cpu/channel_attention.h"

namespace convlstm_fast {
namespace cpu {

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  register_layer_kernels<channel_attention_forward<cells::kOutputAttentionLayer>>(
      m, cells::kOutputAttentionLayer, &channel_attention_backward<cells::kOutputAttentionLayer>);
}

}  // namespace cpu
}  // namespace convlstm_fast
