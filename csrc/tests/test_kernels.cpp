// Unit tests of the torch-free core: the shared element-wise math (dpf_math.h) and the CPU
// kernels (cpu/kernels.h). Run by ctest; no framework, a failed check exits non-zero.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "../cpu/kernels.h"
#include "../dpf_math.h"

namespace {

int failures = 0;

#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

using namespace dpf;

void test_magnitude_bits_are_monotone() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> expo(-45.f, 38.f);
  std::vector<float> values = {0.f, -0.f, 1e-45f, -1e-45f, 1.17549435e-38f, 1.f, -1.f,
                               3.4e38f, std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 2000; ++i) values.push_back((i % 2 ? -1.f : 1.f) * std::pow(10.f, expo(rng)));
  for (float a : values)
    for (float b : {values[0], values[3], values[7], values[values.size() / 2]}) {
      const bool bits_ge = magnitude_bits(a) >= magnitude_bits(b);
      CHECK(bits_ge == (std::fabs(a) >= std::fabs(b)));
    }
  CHECK(magnitude_bits(-0.f) == 0u);
  CHECK(high_bin(magnitude_bits(1.f)) == 0x3F80u);
  CHECK(high_bin(magnitude_bits(std::numeric_limits<float>::infinity())) == 0x7F80u);
  CHECK(high_bin(magnitude_bits(std::nanf(""))) >= 0x7F80u);
}

void test_keep_and_threshold_bits() {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(keep(magnitude_bits(0.5f), threshold_bits(0.5f)));
  CHECK(!keep(magnitude_bits(0.49f), threshold_bits(0.5f)));
  CHECK(keep(magnitude_bits(0.f), threshold_bits(-0.f)));   // -0.0 keeps everything
  CHECK(keep(magnitude_bits(0.f), threshold_bits(-1.f)));
  CHECK(!keep(magnitude_bits(5.f), threshold_bits(std::nanf(""))));  // NaN keeps nothing
  CHECK(keep(magnitude_bits(-inf), threshold_bits(1e30f)));
  CHECK(!keep(magnitude_bits(std::nanf("")), threshold_bits(0.f)));  // NaN is never kept
  CHECK(keep(magnitude_bits(1e-45f), threshold_bits(1e-45f)));       // subnormals exact
  CHECK(!keep(magnitude_bits(1e-45f), threshold_bits(3e-45f)));
}

void test_half_round_trip_is_exact() {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_to_float(uint16_t(h));
    if (std::isnan(f)) {
      CHECK(std::isnan(half_to_float(float_to_half(f))));
      continue;
    }
    CHECK(float_to_half(f) == h);
  }
  CHECK(half_to_float(0x3C00u) == 1.f);
  CHECK(half_to_float(0x0001u) == std::ldexp(1.f, -24));  // smallest subnormal
  CHECK(half_to_float(0x7BFFu) == 65504.f);
}

// float_to_half returns the nearest half (ties to even) for arbitrary floats.
void test_half_rounding_is_nearest_even() {
  std::mt19937 rng(2);
  std::uniform_int_distribution<uint32_t> bits(0, 0x477FFFFFu);
  for (int i = 0; i < 200000; ++i) {
    const float f = bits_float(bits(rng));
    const uint16_t h = float_to_half(f);
    const float r = half_to_float(h);
    const float err = std::fabs(r - f);
    const float down = h > 0 ? std::fabs(half_to_float(uint16_t(h - 1)) - f) : INFINITY;
    const float up = h < 0x7C00 ? std::fabs(half_to_float(uint16_t(h + 1)) - f) : INFINITY;
    CHECK(err <= down && err <= up);
    if (err == down || err == up) CHECK((h & 1u) == 0);  // a tie goes to the even one
  }
  CHECK(float_to_half(65520.f) == 0x7C00u);  // overflow rounds to infinity
  CHECK(float_to_half(65519.f) == 0x7BFFu);
  CHECK(float_to_half(std::ldexp(1.f, -25)) == 0);           // tie with 0: even
  CHECK(float_to_half(std::ldexp(1.5f, -25)) == 1);
}

void test_bf16_rounding() {
  CHECK(float_to_bf16(1.f) == 0x3F80u);
  CHECK(float_to_bf16(bits_float(0x3F808000u)) == 0x3F80u);  // tie, even stays
  CHECK(float_to_bf16(bits_float(0x3F818000u)) == 0x3F82u);  // tie, odd rounds up
  CHECK(float_to_bf16(bits_float(0x3F808001u)) == 0x3F81u);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = bf16_to_float(uint16_t(b));
    if (!std::isnan(f)) CHECK(float_to_bf16(f) == b);
  }
}

void test_sgd_update_matches_the_formulas() {
  SgdParams s{0.1f, 0.9f, 0.f, 0.01f, false, false};
  float buf = 0.f;
  // fresh buffer: buf = g + wd p; p -= lr buf
  float p = sgd_update(2.f, 1.f, buf, true, s);
  CHECK(buf == 1.f + 0.01f * 2.f);
  CHECK(p == 2.f - 0.1f * buf);
  // next step: buf = m buf + g'
  const float old = buf;
  const float g2 = 0.5f + 0.01f * p;
  p = sgd_update(p, 0.5f, buf, false, s);
  CHECK(buf == 0.9f * old + 1.f * g2);
  // Nesterov uses g + m buf
  s.nesterov = true;
  float b2 = 1.f;
  const float q = sgd_update(1.f, 2.f, b2, false, s);
  const float d = 2.f + 0.01f * 1.f;
  const float nb = 0.9f * 1.f + d;
  CHECK(b2 == nb);
  CHECK(q == 1.f - 0.1f * (d + 0.9f * nb));
  // no momentum, maximize
  SgdParams plain{0.5f, 0.f, 0.f, 0.f, false, true};
  float unused = 7.f;
  CHECK(sgd_update(1.f, 2.f, unused, false, plain) == 2.f);
  CHECK(unused == 7.f);
}

void test_cpu_kernels() {
  const std::vector<float> w = {0.f, -0.f, 1.f, -2.f, 0.5f, 3.f, -1.f, 1e-40f};
  std::vector<int32_t> hist(kHighBins, 0);
  cpu::histogram_high(w.data(), 0, int64_t(w.size()), hist.data(), nullptr, 0);
  CHECK(hist[0] == 2);  // +0.0 and -0.0
  CHECK(hist[high_bin(magnitude_bits(1e-40f))] == 1 && high_bin(magnitude_bits(1e-40f)) == 1);
  CHECK(hist[0x3F80] == 2);
  std::vector<int32_t> low(kLowBins, 0);
  cpu::histogram_low(w.data(), 0, int64_t(w.size()), 0u, low.data());
  CHECK(low[0] == 2);
  cpu::histogram_low(w.data(), 0, int64_t(w.size()), 1u, low.data());
  CHECK(low[magnitude_bits(1e-40f) & 0xFFFF] == 1);

  std::vector<char> raw = {1, 0, 0, 1, 1, 0, 0, 1};
  bool mask[8];
  for (int i = 0; i < 8; ++i) mask[i] = raw[i];
  int64_t kept = 0, back = 0;
  cpu::update_mask(w.data(), 0, 8, threshold_bits(1.f), false, nullptr, 0, mask, &kept, &back);
  CHECK(kept == 4 && back == 3);  // 1, -2, 3, -1 kept; 1, 3, -1 were pruned
  kept = back = 0;
  cpu::update_mask(w.data(), 0, 8, threshold_bits(0.f), true, nullptr, 0, mask, &kept, &back);
  CHECK(kept == 4 && back == 0);  // shrink-only: nothing returns

  // channel floor: rows of 3 (the last row has 2), keys recorded over split ranges
  const std::vector<float> r = {0.5f, -2.f, 2.f, 0.f, 0.f, 0.f, 1.f, -4.f};
  std::vector<int64_t> row_max(3, 0);
  std::vector<int32_t> rh(kHighBins, 0);
  cpu::histogram_high(r.data(), 0, 4, rh.data(), row_max.data(), 3);
  cpu::histogram_high(r.data(), 4, 8, rh.data(), row_max.data(), 3);
  CHECK(key_column(row_max[0]) == 1 && (row_max[0] >> 32) == magnitude_bits(2.f));  // first of a tie
  CHECK(key_column(row_max[1]) == 0 && (row_max[1] >> 32) == 0);  // all-zero row: its first
  CHECK(key_column(row_max[2]) == 1);
  CHECK(key_column(0) == -1);
  bool fm[8] = {};
  kept = back = 0;
  cpu::update_mask(r.data(), 0, 8, threshold_bits(3.f), false, row_max.data(), 3, fm, &kept, &back);
  CHECK(kept == 3 && back == 3 && fm[1] && fm[3] && fm[7] && !fm[2] && !fm[6]);

  std::vector<Half> hw = {from_float<Half>(-1.5f), from_float<Half>(2.f)};
  std::vector<Half> out(2);
  bool m2[2] = {false, true};
  cpu::masked_weight(hw.data(), m2, 2, out.data());
  CHECK(out[0].x == 0x8000u && to_float(out[1]) == 2.f);  // -1.5 * 0 = -0.0

  std::vector<float> p = {1.f, -1.f}, g = {0.5f, 0.5f}, b(2), mo(2);
  std::vector<int32_t> h(kHighBins, 0);
  const SgdParams s{0.1f, 0.9f, 0.f, 0.f, false, false};
  std::vector<int64_t> prow(1, 0);
  cpu::sgd_step(p.data(), g.data(), b.data(), true, 0, 2, s, m2, mo.data(), h.data(), prow.data(), 2);
  CHECK(key_column(prow[0]) == 1 && (prow[0] >> 32) == magnitude_bits(p[1]));  // |-1.05| > |0.95|
  CHECK(p[0] == 1.f - 0.1f * 0.5f && b[0] == 0.5f);
  CHECK(mo[0] == 0.f && mo[1] == p[1]);
  CHECK(h[high_bin(magnitude_bits(p[0]))] + h[high_bin(magnitude_bits(p[1]))] >= 2);
}

}  // namespace

int main() {
  test_magnitude_bits_are_monotone();
  test_keep_and_threshold_bits();
  test_half_round_trip_is_exact();
  test_half_rounding_is_nearest_even();
  test_bf16_rounding();
  test_sgd_update_matches_the_formulas();
  test_cpu_kernels();
  if (failures) {
    std::fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  std::puts("all checks passed");
  return 0;
}
