// Schemas of every apb_sparse op (implementations: cpu/sparse_ops.cpp, cuda/*.cu).
//
// max_pool2x2: nn.MaxPool2d(2, 2)'s values for inference (CPU; cpu/pool_ops.cpp).
//
// sparse_conv2d_pair: sparse_conv2d(sparse_conv2d(input, conv 1, relu=relu1), conv 2, residual, relu,
// max_pool) in one call, for inference (CPU; the intermediate activation stays in the kernel's
// layout, chunk by chunk, where both layers take the images-in-lanes layout).  Optionally the
// residual is a third sparse conv of the input (shortcut_*: 1x1, conv 1's stride, no padding, as
// ResNet's downsampling shortcut), run on conv 1's input chunk.
//
// sparse_conv2d optionally fuses a residual add and a ReLU: relu(conv(input) + bias + residual),
// then a 2x2 stride-2 max pool (max_pool: nn.MaxPool2d(2, 2)'s values).
//
// Sparse weights are CSR over output channels (or output features): row_ptr int32 [O + 1],
// col_idx int32 [nnz] with the tap index (c_in_group * kH + kh) * kW + kw, values [nnz].
#include <torch/library.h>

TORCH_LIBRARY(apb_sparse, m) {
  m.def(
      "masked_conv2d(Tensor input, Tensor weight, Tensor mask, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "masked_conv2d_backward_input(Tensor grad_output, Tensor weight, Tensor mask, int[] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "sparse_conv2d(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, int[] weight_size, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? residual=None, "
      "bool relu=False, bool max_pool=False) -> Tensor");
  m.def(
      "sparse_conv2d_backward_input(Tensor grad_output, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "int[] weight_size, int[] input_size, int[2] stride, int[2] padding, int[2] dilation, int groups) "
      "-> Tensor");
  m.def(
      "sparse_linear(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, int in_features, "
      "Tensor? bias) -> Tensor");
  m.def(
      "sparse_conv2d_pair(Tensor input, Tensor values1, Tensor row_ptr1, Tensor col_idx1, int[] weight_size1, "
      "Tensor? bias1, int[2] stride1, int[2] padding1, int[2] dilation1, int groups1, bool relu1, Tensor values2, "
      "Tensor row_ptr2, Tensor col_idx2, int[] weight_size2, Tensor? bias2, int[2] stride2, int[2] padding2, "
      "int[2] dilation2, int groups2, Tensor? residual=None, bool relu=False, bool max_pool=False, "
      "Tensor? shortcut_values=None, Tensor? shortcut_row_ptr=None, Tensor? shortcut_col_idx=None, "
      "Tensor? shortcut_bias=None) -> Tensor");
  m.def("max_pool2x2(Tensor input) -> Tensor");
  m.def(
      "sparse_linear_backward_input(Tensor grad_output, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "int in_features) -> Tensor");
}
