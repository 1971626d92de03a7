// The dpf op library: schemas defined once here; each backend registers its kernels with
// TORCH_LIBRARY_IMPL (cpu/ops.cpp, cuda/ops.cpp). Fake kernels and autograd formulas are
// registered from Python (dpf_ext/ops/compiled.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dpf_ext._C` loads this library, which registers the ops as a side effect.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(dpf, m) {
  m.def(
      "magnitude_histogram(Tensor[] weights, Tensor? prefix, Tensor(a!)[] row_max, Tensor(b!)? window, "
      "Tensor? window_start) -> Tensor");
  m.def(
      "update_masks(Tensor[] weights, Tensor taus, Tensor(a!)[] masks, bool shrink_only, "
      "Tensor[] row_max) -> Tensor");
  m.def("masked_weight(Tensor weight, Tensor mask, bool feedback) -> Tensor");
  m.def("nm_masks(Tensor[] weights, int n, int m, Tensor(a!)[] masks) -> Tensor");
  // The sparse products (index: CSR by row, ptr int64 rows + 1, idx int32): the product of
  // the kept weights with batch-major activations xt (cols, B), giving (B, rows); and the
  // sampled product dyt (rows, B) times xt transposed at the kept positions, giving the dense
  // (rows, cols) with zeros elsewhere.
  m.def("sparse_mm(Tensor xt, Tensor values, Tensor ptr, Tensor idx, Tensor? bias) -> Tensor");
  m.def("sampled_mm(Tensor dyt, Tensor xt, Tensor ptr, Tensor idx) -> Tensor");
  // The same sums at the kept positions only, one per kept weight in the index's order (the
  // gradient of a layer that stores only its kept values).
  m.def("sampled_values(Tensor dyt, Tensor xt, Tensor ptr, Tensor idx) -> Tensor");
  // Their layout: x (B, cols) as the batch-major xt (cols, B), with the sum over the batch of
  // each column when sums (the bias gradient; else an empty tensor).
  m.def("batch_major(Tensor x, bool sums) -> (Tensor, Tensor)");
  // The kept values of a 2-D weight (any strides) in the order of its CSR index (ptr, idx).
  m.def("kept_values(Tensor weight, Tensor ptr, Tensor idx) -> Tensor");
  // The direct sparse convolution (stride 1, "same" padding, odd kernel), in torch's layout:
  // x (N, C, H, W) with the kept weights CSR by output channel over the columns c * kh * kw +
  // i * kw + j, giving (N, rows, H, W); and its weight gradient at the kept entries from dy
  // (N, rows, H, W), giving the dense (rows, C * kh * kw) with zeros elsewhere.
  m.def("sparse_conv(Tensor x, Tensor values, Tensor ptr, Tensor idx, int kh, int kw, Tensor? bias) -> Tensor");
  m.def("sampled_conv(Tensor dy, Tensor x, Tensor ptr, Tensor idx, int kh, int kw) -> Tensor");
  // Both CSR indices (by row, by column) of a 2-D bool mask, with storage offsets r*s0 + c*s1.
  m.def("sparse_index(Tensor mask, int s0, int s1) -> Tensor[]");
  m.def(
      "feedback_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "bool[] fresh, float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, Tensor[] masks, Tensor(c!)[] masked_out, Tensor(d!)? histogram, "
      "Tensor(e!)[] row_max, Tensor(f!)? window, Tensor? window_start) -> ()");
  m.def(
      "feedback_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, int step, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "Tensor(e!)? histogram, Tensor(f!)[] row_max, Tensor(g!)? window, Tensor? window_start) -> ()");
}
