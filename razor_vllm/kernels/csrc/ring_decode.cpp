// razor_cpu::ring_decode: one decode step of X local heads for B requests on the paged layout's
// ring regions, fused into one call (the CPU twin of razor_vllm/kernels/ring_torch.py:ring_decode, which is its
// test oracle).
//
// Why C++: at decode the ring work of one layer is tiny (B x X regions of S + W + 2 rows), and the
// PyTorch version spends it in ~25 op dispatches per layer, i.e. ~5 ms per step on SmolLM2's 30
// layers, which is what kept razor below stock vLLM at 1k tokens, batch 1 (docs/performance.md).
//
// Region layout (razor_vllm/vllm/layout.py:RingLayout, which passes the state rows' offsets), rows of
// 2*D elements of the cache dtype:
//   [0, S) sinks | [S, S+W) window ring | ksum (fp32 bits) | vsum (fp32 bits) | meta (int32 F)
// Per region (x, b), in this order (what ring_decode does on its gathered copy):
//   1. attention of the G query heads over: the visible sink/window rows (mask[b, j] > -inf), this
//      step's token (key/value), and the compensation token (Ksum / n, Vsum / n) with logit bias
//      mask[b, S+W+1] (-inf when nothing is evicted, or compensation "none");
//   2. fold: if fold[b], the row fold_row[b] (a ring slot, or S+W = this token) is added to the sums;
//   3. meta F := f_new[b]; 4. if write[b], this token is written to slot token_slot[b].
// Steps 2-4 read rows before they are overwritten, so the order matches the gathered copy's.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

template <typename scalar_t, typename index_t>
void ring_decode_impl(const std::vector<at::Tensor>& pages, const std::vector<int64_t>& offsets,
                      const std::vector<at::Tensor>& blocks, const at::Tensor& mask, const at::Tensor& n,
                      const at::Tensor& fold, const at::Tensor& fold_row, const at::Tensor& f_new,
                      const at::Tensor& write, const at::Tensor& token_slot, const at::Tensor& query,
                      const at::Tensor& key, const at::Tensor& value, double scale, int64_t sinks,
                      int64_t window, int64_t ksum_off, int64_t vsum_off, int64_t meta_off, at::Tensor& out) {
  const int64_t nx = static_cast<int64_t>(pages.size());
  const int64_t b = query.size(0), g = query.size(2), d = query.size(3);
  const int64_t nkv = sinks + window;
  const int64_t row = 2 * d;  // elements per slot
  const float* mask_p = mask.data_ptr<float>();
  const int64_t mask_stride = mask.stride(0);
  const float* n_p = n.data_ptr<float>();
  const bool* fold_p = fold.data_ptr<bool>();
  const int64_t* fold_row_p = fold_row.data_ptr<int64_t>();
  const int32_t* f_new_p = f_new.data_ptr<int32_t>();
  const bool* write_p = write.data_ptr<bool>();
  const int64_t* token_slot_p = token_slot.data_ptr<int64_t>();
  const scalar_t* q_p = query.data_ptr<scalar_t>();
  const scalar_t* k_p = key.data_ptr<scalar_t>();
  const scalar_t* v_p = value.data_ptr<scalar_t>();
  scalar_t* o_p = out.data_ptr<scalar_t>();
  const auto qs = query.strides(), ks = key.strides(), vs = value.strides(), os = out.strides();
  std::vector<scalar_t*> page_p(nx);
  std::vector<int64_t> page_stride(nx);
  std::vector<const index_t*> block_p(nx);
  std::vector<int64_t> block_stride(nx);
  for (int64_t x = 0; x < nx; ++x) {
    page_p[x] = pages[x].data_ptr<scalar_t>();
    page_stride[x] = pages[x].stride(0);
    block_p[x] = blocks[x].data_ptr<index_t>();
    block_stride[x] = blocks[x].stride(0);  // e.g. column 0 of a block table
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, nx * b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(nkv + 2), qf(d), acc(d), kn(d), vn(d), khat(d), vhat(d);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t x = i / b, r = i % b;
      scalar_t* reg = page_p[x] + static_cast<int64_t>(block_p[x][r * block_stride[x]]) * page_stride[x] + offsets[x] * row;
      float* ksum = reinterpret_cast<float*>(reg + ksum_off * row);
      float* vsum = reinterpret_cast<float*>(reg + vsum_off * row);
      const float* m = mask_p + r * mask_stride;
      const float inv_n = 1.0f / n_p[r];
      const scalar_t* kr = k_p + r * ks[0] + x * ks[1];
      const scalar_t* vr = v_p + r * vs[0] + x * vs[1];
      for (int64_t e = 0; e < d; ++e) {
        kn[e] = to_f(kr[e * ks[2]]);
        vn[e] = to_f(vr[e * vs[2]]);
        khat[e] = ksum[e] * inv_n;
        vhat[e] = vsum[e] * inv_n;
      }
      for (int64_t h = 0; h < g; ++h) {
        const scalar_t* qr = q_p + r * qs[0] + x * qs[1] + h * qs[2];
        for (int64_t e = 0; e < d; ++e) qf[e] = to_f(qr[e * qs[3]]);
        float mx = neg_inf;
        for (int64_t j = 0; j < nkv + 2; ++j) {
          const float bias = m[j];
          if (bias == neg_inf) {
            logits[j] = neg_inf;
            continue;
          }
          const float* kf = nullptr;
          float dot = 0.f;
          if (j < nkv) {
            const scalar_t* kj = reg + j * row;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < d; ++e) dot += qf[e] * to_f(kj[e]);
          } else {
            kf = j == nkv ? kn.data() : khat.data();
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < d; ++e) dot += qf[e] * kf[e];
          }
          logits[j] = dot * fscale + bias;
          mx = std::max(mx, logits[j]);
        }
        float denom = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < nkv + 2; ++j) {
          if (logits[j] == neg_inf) continue;
          const float p = std::exp(logits[j] - mx);
          denom += p;
          if (j < nkv) {
            const scalar_t* vj = reg + j * row + d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) acc[e] += p * to_f(vj[e]);
          } else {
            const float* vf = j == nkv ? vn.data() : vhat.data();
            for (int64_t e = 0; e < d; ++e) acc[e] += p * vf[e];
          }
        }
        scalar_t* orow = o_p + r * os[0] + x * os[1] + h * os[2];
        const float inv = 1.0f / denom;  // this step's token is always visible: denom > 0
        for (int64_t e = 0; e < d; ++e) orow[e * os[3]] = static_cast<scalar_t>(acc[e] * inv);
      }
      // 2. fold the position leaving the window into the running sums (fp32)
      if (fold_p[r]) {
        const int64_t fr = fold_row_p[r];
        if (fr == nkv) {
          for (int64_t e = 0; e < d; ++e) { ksum[e] += kn[e]; vsum[e] += vn[e]; }
        } else {
          const scalar_t* src = reg + fr * row;
          for (int64_t e = 0; e < d; ++e) { ksum[e] += to_f(src[e]); vsum[e] += to_f(src[d + e]); }
        }
      }
      // 3. frontier
      reinterpret_cast<int32_t*>(reg + meta_off * row)[0] = f_new_p[r];
      // 4. this step's token into its slot (in the cache dtype; exact when it came in that dtype)
      if (write_p[r]) {
        scalar_t* dst = reg + token_slot_p[r] * row;
        for (int64_t e = 0; e < d; ++e) {
          dst[e] = static_cast<scalar_t>(kn[e]);
          dst[d + e] = static_cast<scalar_t>(vn[e]);
        }
      }
    }
  });
}

void ring_decode(at::TensorList pages, at::IntArrayRef offsets, at::TensorList blocks, const at::Tensor& mask,
                 const at::Tensor& n, const at::Tensor& fold, const at::Tensor& fold_row, const at::Tensor& f_new,
                 const at::Tensor& write, const at::Tensor& token_slot, const at::Tensor& query,
                 const at::Tensor& key, const at::Tensor& value, double scale, int64_t sinks, int64_t window,
                 int64_t ksum_offset, int64_t vsum_offset, int64_t meta_offset, at::Tensor out) {
  const int64_t nx = static_cast<int64_t>(pages.size());
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == nx && static_cast<int64_t>(blocks.size()) == nx,
              "ring_decode: pages, offsets and blocks must have one entry per local head");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 3 && value.dim() == 3 && out.sizes() == query.sizes(),
              "ring_decode: query/out [B, X, G, D], key/value [B, X, D]");
  TORCH_CHECK(query.size(1) == nx && key.size(1) == nx && value.size(1) == nx, "ring_decode: X mismatch");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype && out.scalar_type() == dtype,
              "ring_decode: query, key, value and out must share one dtype");
  const int64_t b = query.size(0), d = query.size(3);
  std::vector<at::Tensor> pv(pages.begin(), pages.end()), bv(blocks.begin(), blocks.end());
  for (int64_t x = 0; x < nx; ++x) {
    TORCH_CHECK(pv[x].scalar_type() == dtype, "ring_decode: cache dtype differs from the query's");
    TORCH_CHECK(pv[x].dim() == 3 && pv[x].size(2) == 2 * d && pv[x].stride(2) == 1 && pv[x].stride(1) == 2 * d,
                "ring_decode: page [num_blocks, P, 2*D] with contiguous rows expected");
    TORCH_CHECK(offsets[x] >= 0 && offsets[x] + meta_offset < pv[x].size(1),
                "ring_decode: region at slot ", offsets[x], " with meta row ", meta_offset, " exceeds the page");
    TORCH_CHECK(bv[x].dim() == 1 && bv[x].size(0) == b &&
                    bv[x].scalar_type() == bv[0].scalar_type(),
                "ring_decode: blocks [B] (any stride), one integer dtype");
  }
  for (const auto* t : {&n, &fold, &fold_row, &f_new, &write, &token_slot})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == b && t->is_contiguous(), "ring_decode: plan tensors [B], contiguous");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == b && mask.size(1) == sinks + window + 2,
              "ring_decode: mask [B, S+W+2]");
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.stride(1) == 1 && n.scalar_type() == at::kFloat &&
                  fold.scalar_type() == at::kBool && write.scalar_type() == at::kBool &&
                  fold_row.scalar_type() == at::kLong && token_slot.scalar_type() == at::kLong &&
                  f_new.scalar_type() == at::kInt,
              "ring_decode: plan tensor dtypes (mask/n float32, fold/write bool, rows int64, f_new int32)");
  if (b == 0 || nx == 0) return;
  const bool i32 = bv[0].scalar_type() == at::kInt;
  TORCH_CHECK(i32 || bv[0].scalar_type() == at::kLong, "ring_decode: blocks must be int32 or int64");
  std::vector<int64_t> off(offsets.begin(), offsets.end());
#define RAZOR_RING_DECODE_CASE(T)                                                                          \
  if (i32)                                                                                                  \
    ring_decode_impl<T, int32_t>(pv, off, bv, mask, n, fold, fold_row, f_new, write, token_slot, query, key, \
                                 value, scale, sinks, window, ksum_offset, vsum_offset, meta_offset, out);   \
  else                                                                                                      \
    ring_decode_impl<T, int64_t>(pv, off, bv, mask, n, fold, fold_row, f_new, write, token_slot, query, key, \
                                 value, scale, sinks, window, ksum_offset, vsum_offset, meta_offset, out);
  if (dtype == at::kFloat) {
    RAZOR_RING_DECODE_CASE(float)
  } else if (dtype == at::kBFloat16) {
    RAZOR_RING_DECODE_CASE(at::BFloat16)
  } else if (dtype == at::kHalf) {
    RAZOR_RING_DECODE_CASE(at::Half)
  } else {
    TORCH_CHECK(false, "ring_decode: unsupported dtype ", dtype);
  }
#undef RAZOR_RING_DECODE_CASE
}

}  // namespace

TORCH_LIBRARY(razor_cpu, m) {
  m.def(
      "ring_decode(Tensor(a!)[] pages, int[] offsets, Tensor[] blocks, Tensor mask, Tensor n, Tensor fold, "
      "Tensor fold_row, Tensor f_new, Tensor write, Tensor token_slot, Tensor query, Tensor key, Tensor value, "
      "float scale, int sinks, int window, int ksum_offset, int vsum_offset, int meta_offset, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(razor_cpu, CPU, m) { m.impl("ring_decode", &ring_decode); }
