// A Llama decoder stack's decode-size steps in one C++ call (decode_stack.py): for each layer,
//   RMSNorm(+add) -> qkv matmul -> rope + KV write -> paged attention -> o matmul -> add + RMSNorm
//   -> gate_up matmul -> SiLU * up -> down matmul,
// with the very functions the per-op path calls (kernels.cpp's q4/q8 matmuls and decode_ops.cpp's
// fused ops, included here), in the same order on the same inputs: the results are bit-identical
// to that path; what goes is ~10 Python module calls and ~20 tensor dtype casts / views per layer.
// The weights are handed over once (add_layer); forward returns (h, residual) after the last layer,
// the caller's final norm adds them as before.
#define QCPU_NO_MODULE
#include "kernels.cpp"
#include "decode_ops.cpp"

namespace {

struct Linear {  // one packed projection: q4 (qs, dm) or q8 (qs, d, mins)
  bool q4;
  torch::Tensor qs, scales;
  c10::optional<torch::Tensor> mins, bias;
  int64_t group_size;

  torch::Tensor operator()(const torch::Tensor& x, bool int8_act) const {
    return q4 ? q4_linear(x, qs, scales, group_size, bias, "", int8_act)
              : q8_linear(x, qs, scales, mins, group_size, bias, "", int8_act);
  }
};

struct Layer {
  torch::Tensor in_norm, post_norm, inv_freq;
  Linear qkv, o, gate_up, down;
};

class DecodeStack {
 public:
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale)
      : heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale) {}

  // linear = (is_q4, qs, dm | d, mins or None, group_size, bias or None)
  void add_layer(const torch::Tensor& in_norm, const torch::Tensor& post_norm, const torch::Tensor& inv_freq,
                 const py::tuple& qkv, const py::tuple& o, const py::tuple& gate_up, const py::tuple& down) {
    check_f32(in_norm, "in_norm");
    check_f32(post_norm, "post_norm");
    check_f32(inv_freq, "inv_freq");
    layers_.push_back(Layer{in_norm, post_norm, inv_freq, linear(qkv), linear(o), linear(gate_up), linear(down)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // h [T, hidden] (the embedding's output); positions / slot_mapping int64 [T]; block_tables,
  // seq_lens, query_start_loc int32 (attention metadata); kv_caches: one per layer.
  std::vector<torch::Tensor> forward(torch::Tensor h, const torch::Tensor& positions,
                                     const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& slot_mapping,
                                     const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                                     const torch::Tensor& query_start_loc, bool int8_act) const {
    TORCH_CHECK(kv_caches.size() == layers_.size(), "expected ", layers_.size(), " KV caches, got ",
                kv_caches.size());
    const int64_t t_n = h.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    torch::Tensor residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      torch::Tensor x;
      if (!residual.defined()) {
        x = rms_norm(h, c10::nullopt, l.in_norm, eps_)[0];
        residual = h;
      } else {
        auto normed = rms_norm(h, residual, l.in_norm, eps_);
        x = normed[0];
        residual = normed[1];
      }
      const torch::Tensor qkv = l.qkv(x, int8_act);  // [T, q_size + 2 * kv_size]
      const torch::Tensor q = qkv.narrow(1, 0, q_size).view({t_n, heads_, head_dim_});
      const torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({t_n, kv_heads_, head_dim_});
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({t_n, kv_heads_, head_dim_});
      rotary_kv(q, k, v, positions, l.inv_freq, kv_caches[i], slot_mapping);
      const torch::Tensor attn = paged_attention(q, kv_caches[i], block_tables, seq_lens, query_start_loc, scale_);
      const torch::Tensor attn_out = l.o(attn.view({t_n, q_size}), int8_act);
      auto normed = rms_norm(attn_out, residual, l.post_norm, eps_);
      residual = normed[1];
      h = l.down(silu_mul(l.gate_up(normed[0], int8_act)), int8_act);
    }
    return {h, residual};
  }

 private:
  static Linear linear(const py::tuple& t) {
    TORCH_CHECK(t.size() == 6, "a linear is (is_q4, qs, scales, mins, group_size, bias)");
    auto opt = [](const py::object& o) {
      return o.is_none() ? c10::optional<torch::Tensor>() : c10::optional<torch::Tensor>(o.cast<torch::Tensor>());
    };
    return Linear{t[0].cast<bool>(), t[1].cast<torch::Tensor>(), t[2].cast<torch::Tensor>(), opt(t[3]), opt(t[5]),
                  t[4].cast<int64_t>()};
  }

  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>());
}
