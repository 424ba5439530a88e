// C++ unit tests of csrc/core/entropy (no torch): code-probability tiles against explicit
// products, their backward against finite differences, the entropy and KL scalar math at
// ordinary and extreme logits, and the histogram.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "entropy.h"
#include "check.h"

using namespace pyratok;


static bool close(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1 + std::fabs(b)); }

static double sigmoid(double z) { return 1 / (1 + std::exp(-z)); }

static std::vector<double> random_tokens(int64_t n, int64_t K, double spread, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, spread);
  std::vector<double> x(n * K);
  for (auto& v : x) v = nd(rng);
  return x;
}

// sum_c G_c P_t(c) over the codes of channels [bit0, bit0 + bits) of token t, explicitly
static double weighted_code_sum(const std::vector<double>& x, int64_t K, int64_t t, int64_t bit0, int bits,
                                double coef, const std::vector<double>& G) {
  double total = 0;
  for (int64_t c = 0; c < (int64_t(1) << bits); ++c) {
    double prob = 1;
    for (int j = 0; j < bits; ++j) {
      const double p = sigmoid(coef * x[t * K + bit0 + j]);
      prob *= ((c >> (bits - 1 - j)) & 1) ? p : 1 - p;
    }
    total += G[c] * prob;
  }
  return total;
}

static void test_code_probs_and_backward() {
  const int64_t N = 7, K = 9, bit0 = 2;
  const double coef = 1.7;
  for (int bits : {0, 1, 3, 7}) {
    const int64_t width = int64_t(1) << bits;
    std::vector<double> x = random_tokens(N, K, 0.8, 1 + bits);
    std::vector<double> probs(N * width);
    // rows 2..6 of the tile window starting at token 2
    CodeProbsArgs a{DType::F64, x.data(), K, bit0, bits, coef, 2};
    code_probs_cpu(a, probs.data(), 2, N);
    std::vector<double> G(width);
    std::mt19937 rng(bits);
    std::normal_distribution<double> nd;
    for (auto& g : G) g = nd(rng);
    for (int64_t t = 2; t < N; ++t) {
      double row_sum = 0;
      for (int64_t c = 0; c < width; ++c) row_sum += probs[(t - 2) * width + c];
      CHECK(close(row_sum, 1.0, 1e-14));
      std::vector<double> unit(width, 0.0);
      for (int64_t c = 0; c < width; ++c) {
        unit[c] = 1;
        CHECK(close(probs[(t - 2) * width + c], weighted_code_sum(x, K, t, bit0, bits, coef, unit), 1e-14));
        unit[c] = 0;
      }
    }
    // backward: d/dx sum_c G_c P(c) by central differences
    std::vector<double> grad_probs((N - 2) * width);
    for (int64_t r = 0; r < N - 2; ++r)
      for (int64_t c = 0; c < width; ++c) grad_probs[r * width + c] = G[c];
    std::vector<double> dx(N * K, -123.0);
    code_probs_backward_cpu(a, probs.data(), grad_probs.data(), dx.data(), 2, N);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const bool mine = t >= 2 && k >= bit0 && k < bit0 + bits;
        if (!mine) {
          CHECK(dx[t * K + k] == -123.0);  // other rows and channels untouched
          continue;
        }
        const double h = 1e-6, saved = x[t * K + k];
        x[t * K + k] = saved + h;
        const double up = weighted_code_sum(x, K, t, bit0, bits, coef, G);
        x[t * K + k] = saved - h;
        const double down = weighted_code_sum(x, K, t, bit0, bits, coef, G);
        x[t * K + k] = saved;
        CHECK(close(dx[t * K + k], (up - down) / (2 * h), 1e-7));
      }
  }
}

static void test_code_probs_float_formats() {
  // fp32 and fp16 inputs give fp32 tiles equal to the fp64 tiles of the same values
  const int64_t N = 5, K = 6;
  std::vector<double> xd = random_tokens(N, K, 1.0, 7);
  std::vector<float> xf(N * K);
  std::vector<uint16_t> xh(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    xh[i] = float_to_half((float)xd[i]);
    xf[i] = half_to_float(xh[i]);
    xd[i] = xf[i];
  }
  std::vector<double> pd(N * 64);
  std::vector<float> pf(N * 64), ph(N * 64);
  code_probs_cpu({DType::F64, xd.data(), K, 0, 6, 2.0, 0}, pd.data(), 0, N);
  code_probs_cpu({DType::F32, xf.data(), K, 0, 6, 2.0, 0}, pf.data(), 0, N);
  code_probs_cpu({DType::F16, xh.data(), K, 0, 6, 2.0, 0}, ph.data(), 0, N);
  for (int64_t i = 0; i < N * 64; ++i) {
    CHECK(close(pf[i], pd[i], 1e-5));
    CHECK(pf[i] == ph[i]);
  }
}

static void test_entropy_math() {
  CHECK(close(binary_entropy_w<double>(0.0), std::log(2.0), 1e-15));
  for (double z : {-30.0, -3.0, -0.1, 0.5, 4.0, 40.0}) {
    const double p = sigmoid(z), q = sigmoid(-z);
    const double want = -p * std::log(p) - q * std::log(q);
    CHECK(close(binary_entropy_w<double>(z), want, 1e-10));
    CHECK(binary_entropy_w<double>(z) == binary_entropy_w<double>(-z));
    const double h = 1e-6;
    CHECK(close(binary_entropy_grad_w<double>(z),
                (binary_entropy_w<double>(z + h) - binary_entropy_w<double>(z - h)) / (2 * h), 1e-6));
  }
  // fp32 at large |z|: positive and accurate, where softplus(z) - z sigmoid(z) cancels to 0 or below
  const float hf = binary_entropy_w<float>(30.0f);
  CHECK(hf > 0 && close(hf, binary_entropy_w<double>(30.0), 1e-5));
  for (double z : {1e8, -1e8, 4e7}) {
    CHECK(binary_entropy_w<float>((float)z) == 0.0f);
    CHECK(binary_entropy_grad_w<float>((float)z) == 0.0f);
    CHECK(std::isfinite(sigmoid_w<float>((float)z)) && std::isfinite(softplus_w<float>((float)z)));
  }
  std::vector<double> x = {0.0, 1.0, -2.0, 1e4};
  double want = 0;
  for (double v : x) want += binary_entropy_w<double>(0.5 * v);
  CHECK(close(binary_entropy_sum_cpu(DType::F64, x.data(), 0.5, 0, 4), want, 1e-15));
  std::vector<double> dx(4);
  binary_entropy_backward_cpu(DType::F64, x.data(), 0.5, 2.0, dx.data(), 0, 4);
  for (int i = 0; i < 4; ++i) CHECK(close(dx[i], 2.0 * 0.5 * binary_entropy_grad_w<double>(0.5 * x[i]), 1e-15));
}

static void test_bernoulli_kl_math() {
  for (double a : {-5.0, -0.3, 0.0, 2.0, 8.0})
    for (double b : {-4.0, 0.0, 0.7, 9.0}) {
      const double p = sigmoid(a), r = sigmoid(b);
      const double want = p * std::log(p / r) + (1 - p) * std::log((1 - p) / (1 - r));
      CHECK(close(bernoulli_kl_w<double>(a, b), want, 1e-10));
      const double h = 1e-6;
      double ga, gb;
      bernoulli_kl_backward_cpu(DType::F64, &a, &b, 1.0, &ga, &gb, 0, 1);
      CHECK(close(ga, (bernoulli_kl_w<double>(a + h, b) - bernoulli_kl_w<double>(a - h, b)) / (2 * h), 1e-6));
      CHECK(close(gb, (bernoulli_kl_w<double>(a, b + h) - bernoulli_kl_w<double>(a, b - h)) / (2 * h), 1e-6));
    }
  // saturated logits: zero, never NaN, in fp32
  CHECK(bernoulli_kl_w<float>(1e4f, 1e4f) == 0.0f);
  CHECK(bernoulli_kl_w<float>(1e4f, 1e4f + 1.0f) >= 0.0f);
  CHECK(close(bernoulli_kl_w<float>(1e4f, -1e4f), 1e4, 1e-6));  // log(p / r) = softplus(1e4)
}

static void test_histogram() {
  std::vector<int32_t> idx = {0, 5, 5, 7, 0, 5};
  std::vector<int64_t> counts(8, 0);
  code_histogram_cpu(idx.data(), IndexType::I32, counts.data(), 0, 3);
  code_histogram_cpu(idx.data(), IndexType::I32, counts.data(), 3, 6);
  const int64_t want[8] = {2, 0, 0, 0, 0, 3, 0, 1};
  for (int c = 0; c < 8; ++c) CHECK(counts[c] == want[c]);
}

// The count-tile kernels of the fused exact entropy: sum c log(max(c / total, tiny)) and the
// in-place gradient, against std::log in double, for lengths with and without a partial
// vector of 8, zeros (clamped at the smallest normal), counts from 1e-37 to 1e6, and fp64.
static void test_count_tiles() {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> exponent(-37.0, 6.0);  // soft counts lie in [0, tokens]
  for (int64_t n : {1, 7, 8, 13, 1000, 4099}) {
    std::vector<float> c(n);
    for (int64_t i = 0; i < n; ++i) c[i] = i % 5 == 0 ? 0.0f : float(std::pow(10.0, exponent(rng)));
    const double inv_total = 1.0 / 3.0, scale = -0.25;
    double want = 0, scale_err = 0;
    std::vector<double> want_grad(n);
    for (int64_t i = 0; i < n; ++i) {
      const double l = std::log(std::max(double(c[i]) * inv_total, double(1.17549435e-38f)));
      want += double(c[i]) * l;
      want_grad[i] = scale * (l + 1);
      scale_err += std::fabs(double(c[i]) * l);
    }
    const double sum = count_entropy_tile_cpu(false, c.data(), n, inv_total, false, 0.0);
    CHECK(std::fabs(sum - want) <= 1e-6 * scale_err);
    std::vector<float> g = c;
    const double sum2 = count_entropy_tile_cpu(false, g.data(), n, inv_total, true, scale);
    CHECK(sum2 == sum);
    for (int64_t i = 0; i < n; ++i) CHECK(close(g[i], want_grad[i], 4e-7));
  }
  std::vector<double> d = {0.0, 1e-300, 0.5, 2.0, 7.0};
  double want = 0;
  for (double v : d) want += v * std::log(std::max(v / 7.0, 2.2250738585072014e-308));
  CHECK(close(count_entropy_tile_cpu(true, d.data(), 5, 1.0 / 7.0, false, 0.0), want, 1e-15));
  CHECK(close(count_entropy_tile_cpu(true, d.data(), 5, 1.0 / 7.0, true, -1.0), want, 1e-15));
  CHECK(close(d[2], -(std::log(0.5 / 7.0) + 1), 1e-15));
}

int main() {
  test_count_tiles();
  test_code_probs_and_backward();
  test_code_probs_float_formats();
  test_entropy_math();
  test_bernoulli_kl_math();
  test_histogram();
  return finish("test_entropy");
}
