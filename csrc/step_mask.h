// Per-sample lengths inside a layer's loop (ops/registration.py, `lengths`), shared by the CPU
// and CUDA host loops: step t of sample b counts iff t < lengths[b]. Everything here is an ATen op
// on the call's device (no host synchronisation, so a CUDA loop stays asynchronous), and nothing
// at all when the call has no lengths.
//
// Forward: the state a step starts from is the carried one — the state after the sample's last
// step that counted, or h0/c0 — so a loop keeps H in a carry buffer (output[t] must read zero
// where the step does not count) and lets C carry in its own storage:
//   step t computes from (carried H, C_prev); then carry(t, C_t, C_prev), advance(t, H_carry,
//   H_t), zero_output(t, output[t]).
// Backward: a step that does not count adds nothing and passes dH, dC through: the step runs on
// feed(t, ·) of its incoming state gradients (zero where it does not count, so every gradient it
// forms is zero there) and pass(t, ·) restores the incoming ones into what it wrote for the
// previous step. H_{t−1} of step t is state_before(): the previous step's output where that step
// counted, else h0 (the reverse walk's first valid step).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cells.h"

namespace convlstm_fast {

class StepMask {
 public:
  // `lengths`: int64 [B] on x's device (the caller checked the values against T).
  StepMask(const std::optional<at::Tensor>& lengths, const at::Tensor& x) {
    if (!lengths.has_value() || !lengths->defined()) return;
    TORCH_CHECK(lengths->scalar_type() == at::kLong, "lengths must be int64, got ",
                lengths->scalar_type());
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == x.size(1),
                "lengths must have shape [B] = [", x.size(1), "], got ", lengths->sizes());
    TORCH_CHECK(lengths->device() == x.device(), "lengths must be on x's device (", x.device(),
                "), got ", lengths->device());
    lengths_ = *lengths;
  }

  bool active() const { return lengths_.defined(); }

  // Whether step t of each sample counts, shaped to broadcast over a [B, ...] tensor of `dim`
  // dimensions.
  at::Tensor counts(int64_t t, int64_t dim) const {
    std::vector<int64_t> shape(dim, 1);
    shape[0] = lengths_.size(0);
    return lengths_.gt(t).view(shape);
  }

  // The same for every step at once, [T, B, 1, ...] for a [T, B, ...] tensor of `dim` dimensions.
  at::Tensor all_counts(int64_t steps, int64_t dim) const {
    std::vector<int64_t> shape(dim, 1);
    shape[0] = steps;
    shape[1] = lengths_.size(0);
    return at::arange(steps, lengths_.options()).unsqueeze(1).lt(lengths_).view(shape);
  }

  // state = computed where step t counts, else what it was: `state` holds the step's result on
  // entry (C_t, or the carry buffer updated from H_t), `before` the state the step started from.
  void carry(int64_t t, const at::Tensor& state, const at::Tensor& before) const {
    if (!active()) return;
    state.copy_(at::where(counts(t, state.dim()), state, before));
  }

  // carried = computed where step t counts (H_carry from H_t), else unchanged.
  void advance(int64_t t, const at::Tensor& carried, const at::Tensor& computed) const {
    if (!active()) return;
    carried.copy_(at::where(counts(t, carried.dim()), computed, carried));
  }

  void zero_output(int64_t t, const at::Tensor& output_t) const {
    if (!active()) return;
    output_t.masked_fill_(counts(t, output_t.dim()).logical_not(), 0);
  }

  // grad_output with the steps that do not count zeroed (a fresh tensor; the caller's is
  // untouched), or grad_output itself without lengths.
  at::Tensor output_gradient(const at::Tensor& grad_output) const {
    if (!active()) return grad_output;
    return grad_output.masked_fill(all_counts(grad_output.size(0), grad_output.dim())
                                       .logical_not(), 0);
  }

  // Backward of step t: zeroes, in place, `incoming` (a state gradient the step reads) where the
  // step does not count and returns what it held there (undefined without lengths).
  at::Tensor feed(int64_t t, const at::Tensor& incoming) const {
    if (!active()) return at::Tensor();
    at::Tensor held = incoming.clone();
    incoming.masked_fill_(counts(t, incoming.dim()).logical_not(), 0);
    return held;
  }

  // ... and after it: the gradient it wrote for the previous step is the held incoming one where
  // the step does not count.
  void pass(int64_t t, const at::Tensor& outgoing, const at::Tensor& held) const {
    if (!active()) return;
    outgoing.copy_(at::where(counts(t, outgoing.dim()), outgoing, held));
  }

  // H_{t−1} the forward's step t started from (walk.is_first(t): h0). Walking forwards a step
  // that counts always follows one that did; walking backwards, a sample's first valid step
  // (t = lengths[b] − 1) started from h0.
  at::Tensor state_before(const cells::Walk& walk, int64_t t, const at::Tensor& output,
                          const at::Tensor& h0) const {
    if (walk.is_first(t)) return h0;
    const at::Tensor stored = output[walk.prev(t)];
    if (!active() || !walk.reverse) return stored;
    return at::where(counts(walk.prev(t), stored.dim()), stored, h0);
  }

  // The same for every step at once: [T, B, ...], H_{t−1} of each step t (`stored`, the
  // previous step's output already arranged by time, e.g. cat(h0, output[:-1])).
  at::Tensor states_before(const cells::Walk& walk, const at::Tensor& stored,
                           const at::Tensor& h0) const {
    if (!active() || !walk.reverse) return stored;
    const int64_t steps = stored.size(0);
    // Step t's previous step is t + 1, which counted iff t + 1 < lengths[b].
    const at::Tensor previous_counted =
        at::arange(1, steps + 1, lengths_.options()).unsqueeze(1).lt(lengths_);
    std::vector<int64_t> shape(stored.dim(), 1);
    shape[0] = steps;
    shape[1] = lengths_.size(0);
    return at::where(previous_counted.view(shape), stored, h0.unsqueeze(0));
  }

 private:
  at::Tensor lengths_;
};

}  // namespace convlstm_fast
