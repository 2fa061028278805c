// PyTorch binding of glm's fused attention kernels (flash_attn.cu). Every tensor check lives here; the
// kernels see plain pointers and strides (flash_attn.h).
//
//   forward(q, k, v, causal, scale) -> (o, lse)
//   backward(dout, q, k, v, o, lse, causal, scale) -> (dq, dk, dv)
//   forward_out / backward_out: the same, writing into caller-provided tensors (tests poison them
//   first to prove that every element is written).
//
// q, o, dq: (B, H, Tq, D); k, v, dk, dv: (B, Hkv, Tk, D), H a multiple of Hkv; lse: (B, H, Tq) fp32.
// Inputs may be strided views (e.g. (B, T, H, D) memory seen as (B, H, T, D)) as long as the head dim
// is contiguous and rows are 16-byte aligned; anything else is copied to a contiguous tensor first.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <tuple>

#include "flash_attn.h"

namespace {

bool kernel_friendly(const at::Tensor& t) {
  if (t.stride(3) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

at::Tensor friendly(const at::Tensor& t) { return kernel_friendly(t) ? t : t.contiguous(); }

glm_flash::TensorRef ref(const at::Tensor& t) {
  glm_flash::TensorRef r;
  r.ptr = t.data_ptr();
  r.batch_stride = t.stride(0);
  r.head_stride = t.stride(1);
  r.seq_stride = t.stride(2);
  return r;
}

glm_flash::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? glm_flash::DType::kBFloat16 : glm_flash::DType::kFloat16;
}

// Call under the device guard of the inputs' device.
void check_device_capability() {
  int device = 0, major = 0, minor = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, "cannot query the current CUDA device");
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major >= 8, "glm fused attention needs compute capability 8.0 or newer, got ", major, ".",
              minor);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "q, k, v must be on one device");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, T, D)");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "head dim must be 64 or 128, got ", D);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == D, "k/v batch or head dim differ from q");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  TORCH_CHECK(k.size(2) > 0, "attention over zero keys is undefined");
  TORCH_CHECK(q.size(2) <= INT32_MAX && k.size(2) <= INT32_MAX && q.size(0) <= 65535 && q.size(1) <= 65535,
              "shape too large for the kernel's grid");
  TORCH_CHECK(scale > 0.0, "scale must be positive, got ", scale);
}

void check_out(const at::Tensor& out, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(out.device() == like.device(), name, " must be on the inputs' device");
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(out.sizes() == shape, name, " must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK(kernel_friendly(out), name, " needs a contiguous head dim and 16-byte aligned rows");
}

void forward_out(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal,
                 double scale, at::Tensor o, at::Tensor lse) {
  check_qkv(q_in, k_in, v_in, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_device_capability();
  const at::Tensor q = friendly(q_in), k = friendly(k_in), v = friendly(v_in);
  check_out(o, q, q.sizes(), "o");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "lse must be a contiguous float32 (B, H, Tq) tensor on the inputs' device");

  glm_flash::FwdParams p;
  p.q = ref(q);
  p.k = ref(k);
  p.v = ref(v);
  p.o = ref(o);
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.seq_q = static_cast<int>(q.size(2));
  p.seq_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  const cudaError_t err = glm_flash::flash_fwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "glm fused attention forward failed to launch: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           bool causal, double scale) {
  check_qkv(q, k, v, scale);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  // (B, T, H, D) memory seen as (B, H, T, D): the model's `o.transpose(1, 2).reshape(B, T, H * D)`
  // is then free.
  at::Tensor o = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  forward_out(q, k, v, causal, scale, o, lse);
  return {o, lse};
}

void backward_out(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                  const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse, bool causal,
                  double scale, at::Tensor dq, at::Tensor dk, at::Tensor dv) {
  check_qkv(q_in, k_in, v_in, scale);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && o_in.sizes() == q_in.sizes(),
              "dout and o must have q's shape");
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type() && o_in.scalar_type() == q_in.scalar_type(),
              "dout and o must have q's dtype");
  TORCH_CHECK(dout_in.device() == q_in.device() && o_in.device() == q_in.device(),
              "dout and o must be on q's device");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q_in.device() &&
                  lse.sizes() == at::IntArrayRef({q_in.size(0), q_in.size(1), q_in.size(2)}),
              "lse must be the float32 (B, H, Tq) tensor the forward returned");
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_device_capability();
  const at::Tensor q = friendly(q_in), k = friendly(k_in), v = friendly(v_in);
  const at::Tensor o = friendly(o_in), dout = friendly(dout_in), lse_c = lse.contiguous();
  check_out(dq, q, q.sizes(), "dq");
  check_out(dk, k, k.sizes(), "dk");
  check_out(dv, v, v.sizes(), "dv");

  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor dq_accum = at::zeros({B, H, T, D}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));

  glm_flash::BwdParams p;
  p.q = ref(q);
  p.k = ref(k);
  p.v = ref(v);
  p.o = ref(o);
  p.dout = ref(dout);
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = ref(dk);
  p.dv = ref(dv);
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(k.size(1));
  p.seq_q = static_cast<int>(T);
  p.seq_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  const cudaError_t err = glm_flash::flash_bwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "glm fused attention backward failed to launch: ", cudaGetErrorString(err));
  dq.copy_(dq_accum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& o, const at::Tensor& lse,
                                                        bool causal, double scale) {
  check_qkv(q, k, v, scale);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor dq = at::empty({B, T, H, D}, q.options()).transpose(1, 2);  // q's usual layout
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  backward_out(dout, q, k, v, o, lse, causal, scale, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "glm fused (flash-style) attention: tiled online-softmax forward and recomputing backward";
  m.def("forward", &forward, "(q, k, v, causal, scale) -> (o, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("causal"), py::arg("scale"));
  m.def("forward_out", &forward_out, "forward into given o (B, H, Tq, D) and lse (B, H, Tq) fp32",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal"), py::arg("scale"), py::arg("o"),
        py::arg("lse"));
  m.def("backward", &backward, "(dout, q, k, v, o, lse, causal, scale) -> (dq, dk, dv)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("causal"),
        py::arg("scale"));
  m.def("backward_out", &backward_out, "backward into given dq, dk, dv", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("causal"), py::arg("scale"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"));
}
