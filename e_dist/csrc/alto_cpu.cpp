// Multi-tensor CPU kernels for ALTO's update.
//
// Every entry point walks a list of local tensors once. A local tensor is
// split into segments by an offsets vector (segment s covers
// [offsets[s], offsets[s + 1])); the sums a kernel returns are per segment, so
// one local tensor may hold pieces of several parameters.
//
// All segments of all tensors are cut into fixed chunks, and one parallel loop
// runs over every chunk of a call. Partial sums are added per segment in chunk
// order, so results do not depend on the number of threads.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;

struct Moments {
  double scale_grad;  // global-norm clip coefficient
  double c;           // alpha * (1 - beta1)
  double beta1, beta2, beta3;
  double bias_correction2, bias_correction3;
  double eps, weight_decay;
  double lr;          // used only when the update is applied in the same pass
};

// ALTO's first pass over [lo, hi): advance the gradient EMA and both moments
// in place; with Apply, also take the step theta -= lr * r at once, otherwise
// add sum(theta^2) and sum(r^2) into the two accumulators.
template <bool Apply, typename scalar_t>
void advance_range(const Moments& h, scalar_t* __restrict__ param,
                   const scalar_t* __restrict__ grad,
                   scalar_t* __restrict__ grad_ema,
                   scalar_t* __restrict__ exp_avg,
                   scalar_t* __restrict__ exp_avg_sq, int64_t lo, int64_t hi,
                   double* sum_param_sq, double* sum_update_sq) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = static_cast<opmath_t>(h.scale_grad);
  const opmath_t c = static_cast<opmath_t>(h.c);
  const opmath_t one_plus_c = 1 + c;
  const opmath_t b1 = static_cast<opmath_t>(h.beta1);
  const opmath_t b2 = static_cast<opmath_t>(h.beta2);
  const opmath_t b3 = static_cast<opmath_t>(h.beta3);
  const opmath_t one_minus_b1 = 1 - b1, one_minus_b2 = 1 - b2, one_minus_b3 = 1 - b3;
  const opmath_t inv_bc2 = static_cast<opmath_t>(1.0 / h.bias_correction2);
  const opmath_t inv_bc3 = static_cast<opmath_t>(1.0 / h.bias_correction3);
  const opmath_t eps = static_cast<opmath_t>(h.eps);
  const opmath_t wd = static_cast<opmath_t>(h.weight_decay);
  const opmath_t lr = static_cast<opmath_t>(h.lr);
  double acc_w = 0.0, acc_r = 0.0;
#pragma omp simd reduction(+ : acc_w, acc_r)
  for (int64_t i = lo; i < hi; ++i) {
    const opmath_t g = static_cast<opmath_t>(grad[i]) * scale;
    const opmath_t mu = static_cast<opmath_t>(grad_ema[i]);
    const opmath_t g_tilde = one_plus_c * g - c * mu;
    grad_ema[i] = static_cast<scalar_t>(b1 * mu + one_minus_b1 * g);
    const scalar_t m = static_cast<scalar_t>(
        static_cast<opmath_t>(exp_avg[i]) * b2 + one_minus_b2 * g_tilde);
    const scalar_t v = static_cast<scalar_t>(
        static_cast<opmath_t>(exp_avg_sq[i]) * b3 + one_minus_b3 * g_tilde * g_tilde);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const opmath_t w = static_cast<opmath_t>(param[i]);
    const opmath_t m_hat = static_cast<opmath_t>(m) * inv_bc2;
    const opmath_t v_hat = static_cast<opmath_t>(v) * inv_bc3;
    const opmath_t r = m_hat / (std::sqrt(v_hat) + eps) + wd * w;
    if constexpr (Apply) {
      param[i] = static_cast<scalar_t>(w - lr * r);
    } else {
      acc_w += static_cast<double>(w) * static_cast<double>(w);
      acc_r += static_cast<double>(r) * static_cast<double>(r);
    }
  }
  if constexpr (!Apply) {
    *sum_param_sq = acc_w;
    *sum_update_sq = acc_r;
  }
}

// ALTO's second pass over [lo, hi): theta -= step_size * r, with r recomputed
// from the advanced moments by the same operations as in the first pass.
template <typename scalar_t>
void apply_range(const Moments& h, double step_size_d, scalar_t* __restrict__ param,
                 const scalar_t* __restrict__ exp_avg,
                 const scalar_t* __restrict__ exp_avg_sq, int64_t lo, int64_t hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t inv_bc2 = static_cast<opmath_t>(1.0 / h.bias_correction2);
  const opmath_t inv_bc3 = static_cast<opmath_t>(1.0 / h.bias_correction3);
  const opmath_t eps = static_cast<opmath_t>(h.eps);
  const opmath_t wd = static_cast<opmath_t>(h.weight_decay);
  const opmath_t step_size = static_cast<opmath_t>(step_size_d);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const opmath_t w = static_cast<opmath_t>(param[i]);
    const opmath_t m_hat = static_cast<opmath_t>(exp_avg[i]) * inv_bc2;
    const opmath_t v_hat = static_cast<opmath_t>(exp_avg_sq[i]) * inv_bc3;
    const opmath_t r = m_hat / (std::sqrt(v_hat) + eps) + wd * w;
    param[i] = static_cast<scalar_t>(w - step_size * r);
  }
}

// Sum of squares over [lo, hi).
template <typename scalar_t>
double sq_sum_range(const scalar_t* __restrict__ x, int64_t lo, int64_t hi) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = lo; i < hi; ++i) {
    const double v = static_cast<double>(x[i]);
    acc += v * v;
  }
  return acc;
}

// E's transform over [lo, hi): g <- (1 + c) g - c mu, mu <- beta mu + (1 - beta) g.
template <typename scalar_t>
void explore_range(double c_d, double beta_d, scalar_t* __restrict__ grad,
                   scalar_t* __restrict__ grad_ema, int64_t lo, int64_t hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t c = static_cast<opmath_t>(c_d);
  const opmath_t one_plus_c = 1 + c;
  const opmath_t beta = static_cast<opmath_t>(beta_d);
  const opmath_t one_minus_beta = 1 - beta;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const opmath_t g = static_cast<opmath_t>(grad[i]);
    const opmath_t mu = static_cast<opmath_t>(grad_ema[i]);
    grad[i] = static_cast<scalar_t>(one_plus_c * g - c * mu);
    grad_ema[i] = static_cast<scalar_t>(beta * mu + one_minus_beta * g);
  }
}

void check_tensor(const at::Tensor& a, const at::Tensor& param, const char* what) {
  TORCH_CHECK(a.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(a.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(a.numel() == param.numel(), what, " has ", a.numel(),
              " elements, its parameter ", param.numel());
  TORCH_CHECK(a.scalar_type() == param.scalar_type(), what, " has dtype ",
              a.scalar_type(), ", its parameter ", param.scalar_type());
}

// One chunk of work: elements [lo, hi) of tensor `tensor`, inside segment
// `segment` (numbered across all tensors of the call).
struct Chunk {
  int64_t tensor, segment, lo, hi;
};

// The chunks of every segment of every tensor, in order; empty segments get
// none. Also returns the number of segments.
std::vector<Chunk> plan(const std::vector<std::vector<int64_t>>& offsets,
                        int64_t* num_segments) {
  std::vector<Chunk> chunks;
  int64_t segment = 0;
  for (size_t t = 0; t < offsets.size(); ++t) {
    const auto& off = offsets[t];
    TORCH_CHECK(!off.empty(), "offsets of tensor ", t, " are empty");
    for (size_t s = 0; s + 1 < off.size(); ++s, ++segment) {
      TORCH_CHECK(off[s] <= off[s + 1], "offsets of tensor ", t, " decrease");
      for (int64_t lo = off[s]; lo < off[s + 1]; lo += kChunk) {
        chunks.push_back({static_cast<int64_t>(t), segment, lo,
                          std::min(off[s + 1], lo + kChunk)});
      }
    }
  }
  *num_segments = segment;
  return chunks;
}

void check_offsets(const at::Tensor& t, const std::vector<int64_t>& off) {
  TORCH_CHECK(off.front() >= 0 && off.back() <= t.numel(),
              "offsets run outside a tensor of ", t.numel(), " elements");
}

// Runs body(chunk) for every chunk in parallel.
template <typename F>
void run(const std::vector<Chunk>& chunks, const F& body) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) body(i, chunks[i]);
                   });
}

// Adds per-chunk pairs into per-segment pairs, in chunk order.
at::Tensor per_segment(const std::vector<Chunk>& chunks,
                       const std::vector<double>& partial, int64_t num_segments,
                       int64_t width) {
  auto out = at::zeros({num_segments, width}, at::kDouble);
  double* out_ptr = out.data_ptr<double>();
  for (size_t i = 0; i < chunks.size(); ++i) {
    for (int64_t k = 0; k < width; ++k) {
      out_ptr[chunks[i].segment * width + k] += partial[i * width + k];
    }
  }
  return out;
}

#define E_DIST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Sums of squares of each segment of each tensor: [num_segments] float64.
at::Tensor segment_sq_sums(const std::vector<at::Tensor>& tensors,
                           const std::vector<std::vector<int64_t>>& offsets) {
  TORCH_CHECK(tensors.size() == offsets.size(), "one offsets list per tensor");
  for (size_t t = 0; t < tensors.size(); ++t) {
    check_tensor(tensors[t], tensors[t], "tensor");
    check_offsets(tensors[t], offsets[t]);
  }
  int64_t num_segments = 0;
  const auto chunks = plan(offsets, &num_segments);
  std::vector<double> partial(chunks.size());
  run(chunks, [&](int64_t i, const Chunk& c) {
    const auto& x = tensors[c.tensor];
    E_DIST_DISPATCH(x.scalar_type(), "segment_sq_sums", [&] {
      partial[i] = sq_sum_range(x.data_ptr<scalar_t>(), c.lo, c.hi);
    });
  });
  return per_segment(chunks, partial, num_segments, 1).view({num_segments});
}

// First pass. With apply=false: advance the state and return per-segment
// [sum theta^2, sum r^2] as [num_segments, 2] float64. With apply=true: also
// take the step theta -= lr * r at once (no layer adaptation) and return an
// empty [0, 2] tensor.
at::Tensor alto_advance(const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& grad_emas,
                        const std::vector<at::Tensor>& exp_avgs,
                        const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<std::vector<int64_t>>& offsets,
                        const at::Tensor& scale_grad, double c, double beta1,
                        double beta2, double beta3, double bias_correction2,
                        double bias_correction3, double eps,
                        double weight_decay, double lr, bool apply) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && grad_emas.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && offsets.size() == n,
              "every tensor list must have one entry per parameter");
  for (size_t t = 0; t < n; ++t) {
    const auto& p = params[t];
    check_tensor(p, p, "parameter");
    check_tensor(grads[t], p, "grad");
    check_tensor(grad_emas[t], p, "grad_ema");
    check_tensor(exp_avgs[t], p, "exp_avg");
    check_tensor(exp_avg_sqs[t], p, "exp_avg_sq");
    check_offsets(p, offsets[t]);
  }
  TORCH_CHECK(scale_grad.device().is_cpu() && scale_grad.numel() == 1,
              "scale_grad must be a one-element CPU tensor");
  const Moments h{scale_grad.to(at::kDouble).item<double>(), c, beta1, beta2, beta3,
                  bias_correction2, bias_correction3, eps, weight_decay, lr};
  int64_t num_segments = 0;
  const auto chunks = plan(offsets, &num_segments);
  std::vector<double> partial(apply ? 0 : 2 * chunks.size());
  run(chunks, [&](int64_t i, const Chunk& c) {
    const int64_t t = c.tensor;
    E_DIST_DISPATCH(params[t].scalar_type(), "alto_advance", [&] {
      scalar_t* pp = params[t].data_ptr<scalar_t>();
      const scalar_t* gp = grads[t].data_ptr<scalar_t>();
      scalar_t* mup = grad_emas[t].data_ptr<scalar_t>();
      scalar_t* mp = exp_avgs[t].data_ptr<scalar_t>();
      scalar_t* vp = exp_avg_sqs[t].data_ptr<scalar_t>();
      if (apply) {
        advance_range<true>(h, pp, gp, mup, mp, vp, c.lo, c.hi, nullptr, nullptr);
      } else {
        advance_range<false>(h, pp, gp, mup, mp, vp, c.lo, c.hi, &partial[2 * i],
                             &partial[2 * i + 1]);
      }
    });
  });
  if (apply) return at::zeros({0, 2}, at::kDouble);
  return per_segment(chunks, partial, num_segments, 2);
}

// Second pass: theta -= step_sizes[segment] * r, r recomputed from the
// advanced moments exactly as the first pass computed it.
void alto_apply(const std::vector<at::Tensor>& params,
                const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<std::vector<int64_t>>& offsets,
                const at::Tensor& step_sizes, double bias_correction2,
                double bias_correction3, double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && offsets.size() == n,
              "every tensor list must have one entry per parameter");
  for (size_t t = 0; t < n; ++t) {
    const auto& p = params[t];
    check_tensor(p, p, "parameter");
    check_tensor(exp_avgs[t], p, "exp_avg");
    check_tensor(exp_avg_sqs[t], p, "exp_avg_sq");
    check_offsets(p, offsets[t]);
  }
  int64_t num_segments = 0;
  const auto chunks = plan(offsets, &num_segments);
  TORCH_CHECK(step_sizes.numel() == num_segments, "one step size per segment: ",
              num_segments, " expected, ", step_sizes.numel(), " given");
  const Moments h{1.0, 0.0, 0.0, 0.0, 0.0, bias_correction2, bias_correction3,
                  eps, weight_decay, 0.0};
  const auto sizes = step_sizes.to(at::kDouble).contiguous();
  const double* size_ptr = sizes.data_ptr<double>();
  run(chunks, [&](int64_t, const Chunk& c) {
    const int64_t t = c.tensor;
    E_DIST_DISPATCH(params[t].scalar_type(), "alto_apply", [&] {
      apply_range(h, size_ptr[c.segment], params[t].data_ptr<scalar_t>(),
                  exp_avgs[t].data_ptr<scalar_t>(), exp_avg_sqs[t].data_ptr<scalar_t>(),
                  c.lo, c.hi);
    });
  });
}

// E's gradient transform, in place on grads and grad_emas.
void e_explore(const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& grad_emas, double c, double beta) {
  TORCH_CHECK(grads.size() == grad_emas.size(), "one grad_ema per grad");
  std::vector<std::vector<int64_t>> offsets;
  for (size_t t = 0; t < grads.size(); ++t) {
    check_tensor(grads[t], grads[t], "grad");
    check_tensor(grad_emas[t], grads[t], "grad_ema");
    offsets.push_back({0, grads[t].numel()});
  }
  int64_t num_segments = 0;
  const auto chunks = plan(offsets, &num_segments);
  run(chunks, [&](int64_t, const Chunk& ch) {
    const int64_t t = ch.tensor;
    E_DIST_DISPATCH(grads[t].scalar_type(), "e_explore", [&] {
      explore_range(c, beta, grads[t].data_ptr<scalar_t>(),
                    grad_emas[t].data_ptr<scalar_t>(), ch.lo, ch.hi);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_sq_sums", &segment_sq_sums);
  m.def("alto_advance", &alto_advance);
  m.def("alto_apply", &alto_apply);
  m.def("e_explore", &e_explore);
}
