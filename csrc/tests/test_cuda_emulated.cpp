// Runs every CUDA kernel of csrc/cuda/kernels.cu on the CPU (HIP-CPU, see
// csrc/cuda/emulation/) and compares each output with the CPU kernels of cpu/kernels.h:
// three dtypes; sizes 1 ... 100003 across chunk edges; aligned, misaligned and mixed
// pointers; 1, 3 and 132 SMs; the channel floor's rows; empty and full histogram bins; the
// shared-memory limits of every GPU class from sm_75 up. Prints "N passed, N failed".
//
// Device memory is host memory under HIP-CPU, so the tables point at std::vectors.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../cpu/kernels.h"
#include "../cpu/sparse_kernels.h"
#include "../cuda/kernels.h"

namespace {

using namespace dpf;

int passed = 0, failed = 0;

// DPF_EMU_FAIL_FAST=1 (the mutation check): stop at the first failure.
void failure(const std::string& what) {
  ++failed;
  if (failed <= 30) std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  if (std::getenv("DPF_EMU_FAIL_FAST")) {
    std::printf("%d passed, %d failed (stopped at the first failure)\n", passed, failed);
    std::exit(1);
  }
}

void check(bool ok, const std::string& what) {
  if (ok)
    ++passed;
  else
    failure(what);
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) failure(what + ": " + cudaGetErrorString(err));
}

template <typename T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, Half>) return "float16";
  return "bfloat16";
}

template <typename T>
cuda::DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return cuda::DType::kFloat;
  if constexpr (std::is_same_v<T, Half>) return cuda::DType::kHalf;
  return cuda::DType::kBFloat16;
}

// Bit-identical values, except that any NaN equals any NaN (operand order may flip a
// NaN's sign or payload).
template <typename T>
bool same(T a, T b) {
  const float fa = to_float(a), fb = to_float(b);
  if (std::isnan(fa) || std::isnan(fb)) return std::isnan(fa) && std::isnan(fb);
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Row keys equal, a NaN maximum matching any NaN maximum.
bool same_key(int64_t a, int64_t b) {
  const bool na = (a >> 32) > 0x7F800000, nb = (b >> 32) > 0x7F800000;
  return na || nb ? na && nb : a == b;
}

std::mt19937 rng(1234);

constexpr float kCanary = 1024.f;  // exact in every dtype

// A tensor in "device" memory: `offset` elements into its buffer (1: off 16-byte alignment),
// with canaries before and after it that no kernel may touch.
template <typename T>
struct Tensor {
  std::vector<T> buffer;
  int64_t offset = 0;
  int64_t n = 0;
  int64_t row_len = 1;
  T* data() { return buffer.data() + offset; }
  bool canaries_intact() const {
    for (int64_t i = 0; i < int64_t(buffer.size()); ++i)
      if ((i < offset || i >= offset + n) && to_float(buffer[i]) != kCanary) return false;
    return true;
  }
};

enum class Values { kNormal, kSpecial, kConstant };

template <typename T>
Tensor<T> make_tensor(int64_t n, int64_t offset, Values kind, float scale = 1.f) {
  Tensor<T> t;
  t.offset = offset;
  t.n = n;
  t.buffer.assign(n + offset + 8, from_float<T>(kCanary));
  std::normal_distribution<float> normal(0.f, scale);
  const float specials[] = {0.f, -0.f, 1e-40f, -1e-45f, std::numeric_limits<float>::infinity(),
                            std::nanf(""), 3.f, -3.f, 65504.f, 1e-8f};
  for (int64_t i = 0; i < n; ++i) {
    float v = normal(rng);
    if (kind == Values::kSpecial && i % 7 == 3) v = specials[(i / 7) % 10];
    if (kind == Values::kConstant) v = scale;
    t.data()[i] = from_float<T>(v);
  }
  for (int64_t d : {576, 64, 9, 3, 1})
    if (n % d == 0) {
      t.row_len = d;
      break;
    }
  return t;
}

// The table of a list of tensors, with its host-side arrays kept alive.
struct TableData {
  std::vector<const void*> ptrs;
  std::vector<int64_t> numel, starts{0};
  cuda::Table table{};

  template <typename T>
  explicit TableData(std::vector<Tensor<T>>& ts) {
    for (auto& t : ts) {
      ptrs.push_back(t.data());
      numel.push_back(t.n);
      starts.push_back(starts.back() + (t.n + cuda::kChunk - 1) / cuda::kChunk);
    }
    table = {ptrs.data(), numel.data(), starts.data(), int(ts.size()), starts.back()};
  }
};

// Row maxima storage and the Rows view for a list of tensors.
struct RowsData {
  std::vector<std::vector<long long>> keys;
  std::vector<long long*> ptrs;
  std::vector<int64_t> lengths;

  template <typename T>
  explicit RowsData(const std::vector<Tensor<T>>& ts) {
    for (const auto& t : ts) {
      keys.emplace_back(t.n / t.row_len, 0);
      lengths.push_back(t.row_len);
    }
    for (auto& k : keys) ptrs.push_back(k.data());
  }
  cuda::Rows rows() { return {ptrs.data(), lengths.data()}; }
};

const cuda::DeviceInfo kDevices[] = {{1, 227 * 1024}, {3, 227 * 1024}, {132, 227 * 1024}};

template <typename T>
std::vector<std::vector<Tensor<T>>> cases() {
  std::vector<std::vector<Tensor<T>>> out;
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(4095), int64_t(4096), int64_t(4097), int64_t(100003)})
    for (int64_t offset : {0, 1}) out.push_back({make_tensor<T>(n, offset, Values::kNormal)});
  // many tensors in one table: mixed sizes, alignments and scales, special values
  out.push_back({make_tensor<T>(576 * 3, 0, Values::kNormal, 0.01f), make_tensor<T>(9, 1, Values::kSpecial),
                 make_tensor<T>(8191, 3, Values::kSpecial), make_tensor<T>(64 * 130, 0, Values::kNormal, 10.f),
                 make_tensor<T>(1, 0, Values::kNormal)});
  // every element in one histogram bin
  out.push_back({make_tensor<T>(20000, 0, Values::kConstant, 0.75f), make_tensor<T>(333, 1, Values::kConstant, 0.75f)});
  return out;
}

// The fullest finite bin of a high histogram.
int fullest_bin(const std::vector<int32_t>& hist) {
  int fullest = 0;
  for (int b = 0; b < 0x7F80; ++b)
    if (hist[b] > hist[fullest]) fullest = b;
  return fullest;
}

// What a first pass's window of `width` bins from `start` holds for the tensors ts: the low
// histograms of those bins, computed by the CPU's second pass.
template <typename T>
std::vector<int32_t> expected_window(std::vector<Tensor<T>>& ts, int64_t start, int width) {
  std::vector<int32_t> want(size_t(width) * kLowBins, 0);
  for (int slot = 0; slot < width; ++slot)
    if (start + slot >= 0)
      for (auto& t : ts)
        cpu::histogram_low(t.data(), 0, t.n, uint32_t(start + slot), want.data() + size_t(slot) * kLowBins);
  return want;
}

// A full high histogram as a first pass with a window of `width` bins from `start` counts
// it: the finite bins under the window folded into bin start - 1, those over it into bin
// start + width.
std::vector<int32_t> summarised(const std::vector<int32_t>& full, int64_t start, int width) {
  std::vector<int32_t> out(full.size(), 0);
  for (int64_t b = 0; b < int64_t(full.size()); ++b)
    out[b >= 0x7F80 ? b : std::min(std::max(b, start - 1), start + width)] += full[b];
  return out;
}

// A window's first bin around `bin`, holding finite bins only.
int64_t window_start(int bin, int width) { return std::min<int64_t>(bin - 1, 0x7F80 - width); }

bool same_counts(const std::vector<unsigned long long>& got, const std::vector<int32_t>& want) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) ok &= got[i] == (unsigned long long)want[i];
  return ok;
}

template <typename T>
void test_histograms() {
  int idx = 0;
  for (auto& ts : cases<T>()) {
    const std::string name = std::string(dtype_name<T>()) + " case " + std::to_string(idx++);
    TableData tab(ts);
    std::vector<int32_t> expected(kHighBins, 0);
    RowsData expected_rows(ts);
    for (size_t t = 0; t < ts.size(); ++t)
      cpu::histogram_high(ts[t].data(), 0, ts[t].n, expected.data(), reinterpret_cast<int64_t*>(expected_rows.keys[t].data()),
                          ts[t].row_len);
    for (const auto& dev : kDevices) {
      for (bool with_rows : {false, true}) {
        std::vector<unsigned long long> hist(kHighBins, 0);
        RowsData rows(ts);
        check_cuda(cuda::magnitude_histogram(tab.table, dtype_of<T>(), nullptr, hist.data(),
                                             with_rows ? rows.rows() : cuda::Rows{nullptr, nullptr}, dev, nullptr),
                   name + " histogram launch");
        bool ok = true;
        for (int b = 0; b < kHighBins; ++b) ok &= hist[b] == (unsigned long long)expected[b];
        check(ok, name + " high histogram, " + std::to_string(dev.num_sms) + " SMs");
        if (with_rows) {
          bool rows_ok = true;
          for (size_t t = 0; t < ts.size(); ++t)
            for (size_t r = 0; r < rows.keys[t].size(); ++r)
              rows_ok &= same_key(rows.keys[t][r], expected_rows.keys[t][r]);
          check(rows_ok, name + " row maxima, " + std::to_string(dev.num_sms) + " SMs");
        }
      }
    }
    // the first pass's window of low histograms, around the fullest bin
    {
      const int fullest = fullest_bin(expected);
      for (int width : {1, 3}) {
        const int64_t start = window_start(fullest, width);
        std::vector<unsigned long long> window(size_t(width) * kLowBins, 0), hist(kHighBins, 0);
        check_cuda(cuda::magnitude_histogram(tab.table, dtype_of<T>(), nullptr, hist.data(), {nullptr, nullptr},
                                             kDevices[1], nullptr, cuda::Window{window.data(), &start, width}),
                   name + " windowed histogram launch");
        const bool ok = same_counts(window, expected_window(ts, start, width)) &&
                        same_counts(hist, summarised(expected, start, width));
        check(ok, name + " first-pass window of " + std::to_string(width) + " bins");
      }
    }
    // the low pass: the fullest bin, a bin that is empty and the smallest occupied bin
    int fullest = 0, smallest = -1, empty = -1;
    for (int b = 0; b < 0x7F80; ++b) {
      if (expected[b] > expected[fullest]) fullest = b;
      if (expected[b] && smallest < 0) smallest = b;
      if (!expected[b] && empty < 0 && b > 0x3000) empty = b;
    }
    for (int prefix : {fullest, smallest, empty}) {
      if (prefix < 0) continue;
      std::vector<int32_t> low_expected(kLowBins, 0);
      for (auto& t : ts) cpu::histogram_low(t.data(), 0, t.n, uint32_t(prefix), low_expected.data());
      const int64_t pre = prefix;
      for (const auto& dev : kDevices) {
        std::vector<unsigned long long> low(kLowBins, 0);
        check_cuda(cuda::magnitude_histogram(tab.table, dtype_of<T>(), &pre, low.data(), {nullptr, nullptr}, dev, nullptr),
                   name + " low histogram launch");
        bool ok = true;
        for (int b = 0; b < kLowBins; ++b) ok &= low[b] == (unsigned long long)low_expected[b];
        check(ok, name + " low histogram of bin " + std::to_string(prefix));
      }
    }
  }
}

template <typename T>
void test_update_masks() {
  int idx = 0;
  for (auto& ts : cases<T>()) {
    const std::string name = std::string(dtype_name<T>()) + " case " + std::to_string(idx++);
    TableData tab(ts);
    RowsData keys(ts);
    std::vector<int32_t> unused(kHighBins, 0);
    for (size_t t = 0; t < ts.size(); ++t)
      cpu::histogram_high(ts[t].data(), 0, ts[t].n, unused.data(), reinterpret_cast<int64_t*>(keys.keys[t].data()),
                          ts[t].row_len);
    const float median = std::fabs(to_float(ts[0].data()[ts[0].n / 2]));
    for (float tau : {0.f, -0.f, median, 1.f, std::numeric_limits<float>::infinity(), std::nanf("")}) {
      for (bool shrink : {false, true}) {
        for (bool floor : {false, true}) {
          std::bernoulli_distribution coin(0.5);
          std::vector<std::vector<char>> start(ts.size());
          for (size_t t = 0; t < ts.size(); ++t)
            for (int64_t i = 0; i < ts[t].n; ++i) start[t].push_back(coin(rng));
          // the caller's positions in reverse: stats must land at index[t], not t
          const int64_t count = int64_t(ts.size());
          std::vector<int64_t> index(ts.size());
          std::vector<float> taus(ts.size(), tau);
          for (int64_t t = 0; t < count; ++t) index[t] = count - 1 - t;
          std::vector<std::vector<bool>> expected_masks;
          std::vector<int64_t> expected(2 * ts.size(), 0);
          for (size_t t = 0; t < ts.size(); ++t) {
            std::vector<char> m = start[t];
            cpu::update_mask(ts[t].data(), 0, ts[t].n, threshold_bits(tau), shrink,
                             floor ? reinterpret_cast<const int64_t*>(keys.keys[t].data()) : nullptr, ts[t].row_len,
                             reinterpret_cast<bool*>(m.data()), &expected[2 * index[t]], &expected[2 * index[t] + 1]);
            expected_masks.emplace_back(m.begin(), m.end());
          }
          std::vector<std::vector<char>> got = start;
          std::vector<bool*> mask_ptrs;
          for (auto& m : got) mask_ptrs.push_back(reinterpret_cast<bool*>(m.data()));
          std::vector<unsigned long long> stats(2 * ts.size(), 0);
          check_cuda(cuda::update_masks(tab.table, dtype_of<T>(), mask_ptrs.data(), taus.data(), index.data(), shrink,
                                        floor ? keys.rows() : cuda::Rows{nullptr, nullptr}, stats.data(), nullptr),
                     name + " update_masks launch");
          bool ok = true;
          for (size_t t = 0; t < ts.size(); ++t)
            for (int64_t i = 0; i < ts[t].n; ++i) ok &= bool(got[t][i]) == expected_masks[t][i];
          for (size_t k = 0; k < stats.size(); ++k) ok &= stats[k] == (unsigned long long)expected[k];
          check(ok, name + " update_masks tau " + std::to_string(tau) + (shrink ? " shrink" : "") +
                        (floor ? " floor" : ""));
        }
      }
    }
  }
}

template <typename T>
void test_nm_masks() {
  const int patterns[][2] = {{2, 4}, {1, 2}, {1, 3}, {3, 8}, {5, 16}};
  for (const auto& nm : patterns) {
    const int n = nm[0], m = nm[1];
    std::vector<Tensor<T>> ts{make_tensor<T>(int64_t(m) * 3001, 0, Values::kNormal),
                              make_tensor<T>(int64_t(m) * 5, 1, Values::kSpecial),
                              make_tensor<T>(int64_t(m) * 4096, 3, Values::kConstant, 0.5f)};  // all ties
    std::vector<std::vector<char>> start(ts.size());
    for (size_t t = 0; t < ts.size(); ++t)
      for (int64_t i = 0; i < ts[t].n; ++i) start[t].push_back(char(rng() & 1));
    const int64_t count = int64_t(ts.size());
    std::vector<int64_t> index(ts.size()), expected(3 * ts.size(), 0);
    for (int64_t t = 0; t < count; ++t) index[t] = count - 1 - t;
    std::vector<std::vector<char>> want = start, got = start;
    for (size_t t = 0; t < ts.size(); ++t)
      cpu::nm_mask(ts[t].data(), 0, ts[t].n / m, n, m, reinterpret_cast<bool*>(want[t].data()),
                   &expected[3 * index[t]], &expected[3 * index[t] + 1], &expected[3 * index[t] + 2]);
    // the table counts groups
    std::vector<const void*> ptrs;
    std::vector<int64_t> groups, starts{0};
    std::vector<bool*> mask_ptrs;
    for (size_t t = 0; t < ts.size(); ++t) {
      ptrs.push_back(ts[t].data());
      groups.push_back(ts[t].n / m);
      starts.push_back(starts.back() + (groups.back() + cuda::kChunk - 1) / cuda::kChunk);
      mask_ptrs.push_back(reinterpret_cast<bool*>(got[t].data()));
    }
    const cuda::Table tab{ptrs.data(), groups.data(), starts.data(), int(count), starts.back()};
    std::vector<unsigned long long> stats(3 * ts.size(), 0);
    check_cuda(cuda::nm_masks(tab, dtype_of<T>(), mask_ptrs.data(), index.data(), n, m, stats.data(), nullptr),
               "nm_masks launch");
    bool ok = true;
    for (size_t t = 0; t < ts.size(); ++t) ok &= got[t] == want[t];
    for (size_t k = 0; k < stats.size(); ++k) ok &= stats[k] == (unsigned long long)expected[k];
    check(ok, std::string(dtype_name<T>()) + " nm_masks " + std::to_string(n) + ":" + std::to_string(m));
  }
}

template <typename T>
void test_masked_weight() {
  int idx = 0;
  for (auto& ts : cases<T>()) {
    for (auto& t : ts) {
      std::vector<char> mask(t.n);
      for (auto& m : mask) m = char(rng() & 1);
      std::vector<T> expected(t.n), got_buffer(t.n + t.offset);
      T* got = got_buffer.data() + t.offset;
      cpu::masked_weight(t.data(), reinterpret_cast<const bool*>(mask.data()), t.n, expected.data());
      check_cuda(cuda::masked_weight(t.data(), reinterpret_cast<const bool*>(mask.data()), got, t.n,
                                     dtype_of<T>(), nullptr),
                 "masked_weight launch");
      bool ok = true;
      for (int64_t i = 0; i < t.n; ++i) ok &= same(got[i], expected[i]);
      check(ok, std::string(dtype_name<T>()) + " masked_weight case " + std::to_string(idx));
    }
    ++idx;
  }
}

template <typename T>
void test_sgd(const cuda::DeviceInfo& dev, const std::string& label) {
  const SgdParams settings[] = {{0.1f, 0.f, 0.f, 0.f, false, false},
                                {0.05f, 0.9f, 0.f, 1e-3f, true, false},
                                {0.02f, 0.8f, 0.25f, 1e-2f, false, true}};
  int idx = 0;
  for (auto& base : cases<T>()) {
    const std::string name = std::string(dtype_name<T>()) + " case " + std::to_string(idx++) + " " + label;
    for (int setting = 0; setting < 3; ++setting) {
      const SgdParams& hp = settings[setting];
      for (int variant = 0; variant < 4; ++variant) {  // bit 0: histogram + rows; bit 1: masked copy
        const bool with_hist = variant & 1, with_out = variant & 2;
        const bool with_buf = hp.momentum != 0.f;
        // grads and buffers aligned as the params (16-byte loads where the params allow
        // them), except with the last setting: grads off by one element (the mixed case)
        std::vector<Tensor<T>> ps = base, gs, bs, cpu_ps = base, cpu_bs;
        for (auto& p : ps) {
          gs.push_back(make_tensor<T>(p.n, setting == 2 ? 1 - p.offset % 2 : p.offset, Values::kNormal));
          bs.push_back(make_tensor<T>(p.n, p.offset, Values::kNormal));
        }
        cpu_bs = bs;
        std::vector<int64_t> fresh(ps.size());
        for (size_t t = 0; t < ps.size(); ++t) fresh[t] = t % 2;
        std::vector<std::vector<char>> masks(ps.size());
        std::vector<std::vector<T>> outs(ps.size()), cpu_outs(ps.size());
        for (size_t t = 0; t < ps.size(); ++t) {
          for (int64_t i = 0; i < ps[t].n; ++i) masks[t].push_back(char(rng() & 1));
          outs[t].resize(ps[t].n);
          cpu_outs[t].resize(ps[t].n);
        }
        std::vector<int32_t> cpu_hist(kHighBins, 0);
        RowsData cpu_rows(ps), rows(ps);
        for (size_t t = 0; t < ps.size(); ++t)
          cpu::sgd_step(cpu_ps[t].data(), gs[t].data(), with_buf ? cpu_bs[t].data() : nullptr, with_buf && fresh[t], 0,
                        ps[t].n, hp, with_out ? reinterpret_cast<const bool*>(masks[t].data()) : nullptr,
                        with_out ? cpu_outs[t].data() : nullptr, with_hist ? cpu_hist.data() : nullptr,
                        with_hist ? reinterpret_cast<int64_t*>(cpu_rows.keys[t].data()) : nullptr, ps[t].row_len);

        TableData tab(ps);
        std::vector<const void*> gp;
        std::vector<void*> bp, op;
        std::vector<const bool*> mp;
        for (size_t t = 0; t < ps.size(); ++t) {
          gp.push_back(gs[t].data());
          bp.push_back(bs[t].data());
          mp.push_back(reinterpret_cast<const bool*>(masks[t].data()));
          op.push_back(outs[t].data());
        }
        // with the histogram, a window of 3 bins from the one under the updated weights' fullest
        const int64_t start = window_start(fullest_bin(cpu_hist), 3);
        std::vector<unsigned long long> hist(kHighBins, 0), window(3 * kLowBins, 0);
        check_cuda(cuda::sgd_step(tab.table, dtype_of<T>(), gp.data(), with_buf ? bp.data() : nullptr,
                                  with_buf ? fresh.data() : nullptr, with_out ? mp.data() : nullptr,
                                  with_out ? op.data() : nullptr, hp, with_hist ? hist.data() : nullptr,
                                  with_hist ? rows.rows() : cuda::Rows{nullptr, nullptr}, dev, nullptr,
                                  with_hist ? cuda::Window{window.data(), &start, 3} : cuda::Window{nullptr, nullptr, 0}),
                   name + " sgd launch");
        bool ok = true;
        for (size_t t = 0; t < ps.size(); ++t) {
          ok &= ps[t].canaries_intact() && bs[t].canaries_intact();
          for (int64_t i = 0; i < ps[t].n; ++i) {
            ok &= same(ps[t].data()[i], cpu_ps[t].data()[i]);
            if (with_buf) ok &= same(bs[t].data()[i], cpu_bs[t].data()[i]);
            if (with_out) ok &= same(outs[t][i], cpu_outs[t][i]);
          }
        }
        if (with_hist) {
          ok &= same_counts(hist, summarised(cpu_hist, start, 3));
          for (size_t t = 0; t < ps.size(); ++t)
            for (size_t r = 0; r < rows.keys[t].size(); ++r) ok &= same_key(rows.keys[t][r], cpu_rows.keys[t][r]);
          ok &= same_counts(window, expected_window(cpu_ps, start, 3));
        }
        check(ok, name + " sgd lr " + std::to_string(hp.lr) + " variant " + std::to_string(variant));
      }
    }
  }
}

template <typename T>
void test_adamw(const cuda::DeviceInfo& dev, const std::string& label) {
  const AdamwParams settings[] = {{1.f - 1e-5f, 0.1f, 0.999f, 0.001f, 1e-8f, 0.01f, 0.0447f, false, false},
                                  {1.f, 0.2f, 0.99f, 0.01f, 1e-6f, 0.003f, 0.3f, true, true}};
  int idx = 0;
  for (auto& base : cases<T>()) {
    const std::string name = std::string(dtype_name<T>()) + " case " + std::to_string(idx++) + " " + label;
    for (const auto& hp : settings) {
      for (bool with_hist : {false, true}) {
        std::vector<Tensor<T>> ps = base, cpu_ps = base, gs, ms, vs, vmaxs;
        for (auto& p : ps) {
          gs.push_back(make_tensor<T>(p.n, p.offset, Values::kNormal));
          ms.push_back(make_tensor<T>(p.n, p.offset, Values::kNormal, 0.1f));
          vs.push_back(make_tensor<T>(p.n, p.offset, Values::kConstant, 0.01f));
          vmaxs.push_back(make_tensor<T>(p.n, p.offset, Values::kConstant, 0.02f));
        }
        auto cpu_ms = ms, cpu_vs = vs, cpu_vmaxs = vmaxs;
        std::vector<int32_t> cpu_hist(kHighBins, 0);
        RowsData cpu_rows(ps), rows(ps);
        for (size_t t = 0; t < ps.size(); ++t)
          cpu::adamw_step(cpu_ps[t].data(), gs[t].data(), cpu_ms[t].data(), cpu_vs[t].data(),
                          hp.amsgrad ? cpu_vmaxs[t].data() : nullptr, 0, ps[t].n, hp,
                          with_hist ? cpu_hist.data() : nullptr,
                          with_hist ? reinterpret_cast<int64_t*>(cpu_rows.keys[t].data()) : nullptr, ps[t].row_len);
        TableData tab(ps);
        std::vector<const void*> gp;
        std::vector<void*> mp, vp, vmaxp;
        for (size_t t = 0; t < ps.size(); ++t) {
          gp.push_back(gs[t].data());
          mp.push_back(ms[t].data());
          vp.push_back(vs[t].data());
          vmaxp.push_back(vmaxs[t].data());
        }
        const int64_t start = window_start(fullest_bin(cpu_hist), 3);
        std::vector<unsigned long long> hist(kHighBins, 0), window(3 * kLowBins, 0);
        check_cuda(cuda::adamw_step(tab.table, dtype_of<T>(), gp.data(), mp.data(), vp.data(),
                                    hp.amsgrad ? vmaxp.data() : nullptr, hp, with_hist ? hist.data() : nullptr,
                                    with_hist ? rows.rows() : cuda::Rows{nullptr, nullptr}, dev, nullptr,
                                    with_hist ? cuda::Window{window.data(), &start, 3} : cuda::Window{nullptr, nullptr, 0}),
                   name + " adamw launch");
        bool ok = true;
        for (size_t t = 0; t < ps.size(); ++t) {
          ok &= ps[t].canaries_intact() && ms[t].canaries_intact() && vs[t].canaries_intact();
          for (int64_t i = 0; i < ps[t].n; ++i) {
            ok &= same(ps[t].data()[i], cpu_ps[t].data()[i]) && same(ms[t].data()[i], cpu_ms[t].data()[i]) &&
                  same(vs[t].data()[i], cpu_vs[t].data()[i]);
            if (hp.amsgrad) ok &= same(vmaxs[t].data()[i], cpu_vmaxs[t].data()[i]);
          }
        }
        if (with_hist) {
          ok &= same_counts(hist, summarised(cpu_hist, start, 3));
          for (size_t t = 0; t < ps.size(); ++t)
            for (size_t r = 0; r < rows.keys[t].size(); ++r) ok &= same_key(rows.keys[t][r], cpu_rows.keys[t][r]);
          ok &= same_counts(window, expected_window(cpu_ps, start, 3));
        }
        check(ok, name + " adamw" + (hp.amsgrad ? " amsgrad" : "") + (with_hist ? " histogram" : ""));
      }
    }
  }
}

// Each GPU class's shared-memory limit: the histogram passes launch and count right.
template <typename T>
void test_gpu_classes() {
  struct Class {
    const char* name;
    size_t optin;
    cuda::Bins bins;
  };
  const Class classes[] = {{"48 KiB (no opt-in)", 48 * 1024, cuda::Bins::kGlobal},
                           {"sm_75 (64 KiB)", 64 * 1024, cuda::Bins::kShared16},
                           {"sm_86/89/120 (99 KiB)", 99 * 1024, cuda::Bins::kShared16},
                           {"sm_80 (163 KiB)", 163 * 1024, cuda::Bins::kShared32},
                           {"sm_90 (227 KiB)", 227 * 1024, cuda::Bins::kShared32}};
  for (const auto& c : classes) {
    dpf_emu::device().shared_optin = c.optin;
    dpf_emu::opted_in().clear();
    const cuda::DeviceInfo dev{2, int(c.optin)};
    check(cuda::bins_for(dev) == c.bins, std::string("layout for ") + c.name);
    // 200 000 equal magnitudes: one bin counts past 2^16 in every block
    std::vector<Tensor<T>> ts{make_tensor<T>(200000, 0, Values::kConstant, 0.5f),
                              make_tensor<T>(70001, 1, Values::kNormal)};
    TableData tab(ts);
    std::vector<int32_t> expected(kHighBins, 0);
    for (auto& t : ts) cpu::histogram_high(t.data(), 0, t.n, expected.data(), nullptr, 1);
    std::vector<unsigned long long> hist(kHighBins, 0);
    check_cuda(cuda::magnitude_histogram(tab.table, dtype_of<T>(), nullptr, hist.data(), {nullptr, nullptr}, dev, nullptr),
               std::string("histogram on ") + c.name);
    bool ok = true;
    for (int b = 0; b < kHighBins; ++b) ok &= hist[b] == (unsigned long long)expected[b];
    check(ok, std::string(dtype_name<T>()) + " histogram on " + c.name);
    test_sgd<T>(dev, c.name);
    test_adamw<T>(dev, c.name);
  }
  dpf_emu::device().shared_optin = 227 * 1024;
}

__global__ void noop_kernel(int* out) {
  if (threadIdx.x == 0) *out = 1;
}

// The emulator refuses what a GPU refuses.
void test_launch_limits() {
  int out = 0;
  dpf_emu::device().shared_optin = 64 * 1024;
  dpf_emu::opted_in().clear();
  dpf_emu::launch(noop_kernel, dim3(1), dim3(1025), 0, nullptr, &out);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "more than 1024 threads refused");
  dpf_emu::launch(noop_kernel, dim3(1), dim3(32), 49 * 1024, nullptr, &out);
  check(cudaGetLastError() == cudaErrorInvalidValue, "over 48 KiB without opt-in refused");
  check(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 65 * 1024) ==
            cudaErrorInvalidValue,
        "opt-in beyond the device's limit refused");
  check(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
        "opt-in within the device's limit accepted");
  dpf_emu::launch(noop_kernel, dim3(1), dim3(32), 64 * 1024, nullptr, &out);
  check(cudaGetLastError() == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess && out == 1,
        "opted-in launch runs");
  dpf_emu::device().shared_optin = 227 * 1024;
  dpf_emu::opted_in().clear();
}

}  // namespace

// The sparse products against the CPU kernels (sparse_kernels.h, scalar path): sizes across
// the launch's batch and row blocks, empty rows and columns, a fully pruned and a fully kept
// weight, batch 1.
void test_sparse_products() {
  const sparse::Kernels* ref = sparse::kernels("scalar");
  struct Shape {
    int64_t rows, cols, B;
    double density;
  };
  const Shape shapes[] = {{1, 1, 1, 1.0}, {37, 53, 5, 0.3}, {9, 16, 33, 0.0},
                          {70, 20, 65, 1.0}, {300, 41, 1, 0.1}, {17, 130, 40, 0.05}};
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (const auto& sh : shapes) {
    std::bernoulli_distribution keep(sh.density);
    std::vector<int64_t> ptr(sh.rows + 1, 0);
    std::vector<int32_t> idx;
    std::vector<float> val;
    for (int64_t r = 0; r < sh.rows; ++r) {
      const bool empty_row = r % 4 == 3;
      for (int64_t c = 0; c < sh.cols; ++c)
        if (!empty_row && c % 5 != 2 && keep(rng)) {  // every fourth row, every fifth column empty
          idx.push_back(int32_t(c));
          val.push_back(uniform(rng));
        }
      ptr[r + 1] = int64_t(idx.size());
    }
    std::vector<float> xt(sh.cols * sh.B), dyt(sh.rows * sh.B), bias(sh.rows);
    for (auto& v : xt) v = uniform(rng);
    for (auto& v : dyt) v = uniform(rng);
    for (auto& v : bias) v = uniform(rng);
    const std::string name = std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " batch " +
                             std::to_string(sh.B);
    for (const bool with_bias : {true, false}) {
      std::vector<float> want(sh.B * sh.rows), got(sh.B * sh.rows, -7.f);
      const float* b = with_bias ? bias.data() : nullptr;
      sparse::spmm(ref, ptr.data(), idx.data(), val.data(), xt.data(), sh.B, sh.cols, b, want.data(),
                   sh.rows);
      check_cuda(cuda::sparse_mm(ptr.data(), idx.data(), val.data(), xt.data(), sh.B, b, got.data(),
                                 sh.rows, nullptr),
                 "sparse_mm launch");
      bool ok = true;
      for (size_t i = 0; i < want.size(); ++i) ok &= std::fabs(got[i] - want[i]) <= 1e-5f * (1 + std::fabs(want[i]));
      check(ok, "sparse_mm " + name + (with_bias ? " bias" : ""));
    }
    std::vector<float> want(sh.rows * sh.cols), got(sh.rows * sh.cols, -7.f), acc(idx.size() + 1);
    ref->sddmm_rows(ptr.data(), idx.data(), dyt.data(), xt.data(), sh.B, sh.cols, want.data(), acc.data(),
                    0, sh.rows);
    check_cuda(cuda::sampled_mm(ptr.data(), idx.data(), dyt.data(), xt.data(), sh.B, sh.rows, sh.cols,
                                got.data(), nullptr),
               "sampled_mm launch");
    bool ok = true;
    for (size_t i = 0; i < want.size(); ++i) ok &= std::fabs(got[i] - want[i]) <= 1e-5f * (1 + std::fabs(want[i]));
    check(ok, "sampled_mm " + name);
    std::vector<float> vals(idx.size(), -7.f), want_vals(idx.size() + 1);
    ref->sddmm_rows(ptr.data(), idx.data(), dyt.data(), xt.data(), sh.B, sh.cols, nullptr,
                    want_vals.data(), 0, sh.rows);
    check_cuda(cuda::sampled_values(ptr.data(), idx.data(), dyt.data(), xt.data(), sh.B, sh.rows,
                                    int64_t(idx.size()), vals.data(), nullptr),
               "sampled_values launch");
    ok = true;
    for (size_t k = 0; k < vals.size(); ++k) ok &= std::fabs(vals[k] - want_vals[k]) <= 1e-5f * (1 + std::fabs(want_vals[k]));
    check(ok, "sampled_values " + name);
  }
}

// The sparse convolution against the CPU kernels (scalar path): kernels 1x1, 3x3, 5x3, planes
// smaller than the kernel, empty output and input channels, a fully pruned and a fully kept
// weight, one image.
void test_sparse_convolution() {
  const sparse::Kernels* ref = sparse::kernels("scalar");
  struct Shape {
    int64_t N, C, R, H, W, kh, kw;
    double density;
  };
  const Shape shapes[] = {{1, 1, 1, 1, 1, 1, 1, 1.0}, {3, 5, 4, 7, 6, 3, 3, 0.3},
                          {2, 4, 6, 2, 3, 5, 3, 0.5}, {1, 3, 2, 9, 5, 3, 3, 0.0},
                          {2, 2, 3, 4, 4, 3, 3, 1.0}, {4, 6, 5, 5, 8, 1, 1, 0.4}};
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (const auto& sh : shapes) {
    std::bernoulli_distribution keep(sh.density);
    const int64_t cols = sh.C * sh.kh * sh.kw, hw = sh.H * sh.W;
    std::vector<int64_t> ptr(sh.R + 1, 0);
    std::vector<int32_t> idx;
    std::vector<float> val;
    for (int64_t r = 0; r < sh.R; ++r) {
      for (int64_t c = 0; c < cols; ++c)
        if (r % 3 != 2 && c / (sh.kh * sh.kw) % 4 != 3 && keep(rng)) {  // empty channels
          idx.push_back(int32_t(c));
          val.push_back(uniform(rng));
        }
      ptr[r + 1] = int64_t(idx.size());
    }
    std::vector<float> x(sh.N * sh.C * hw), dy(sh.N * sh.R * hw), bias(sh.R);
    for (auto& v : x) v = uniform(rng);
    for (auto& v : dy) v = uniform(rng);
    for (auto& v : bias) v = uniform(rng);
    const sparse::ConvGeometry geo = sparse::conv_geometry(idx.data(), int64_t(idx.size()), sh.H, sh.W,
                                                           sh.kh, sh.kw, ref->lanes);
    const std::string name = std::to_string(sh.R) + "x" + std::to_string(sh.C) + "x" +
                             std::to_string(sh.kh) + "x" + std::to_string(sh.kw) + " on " +
                             std::to_string(sh.N) + "x" + std::to_string(sh.H) + "x" + std::to_string(sh.W);
    for (const bool with_bias : {true, false}) {
      std::vector<float> want(sh.N * sh.R * hw), got(want.size(), -7.f);
      const float* b = with_bias ? bias.data() : nullptr;
      ref->conv_planes(ptr.data(), geo.off.data(), geo.tap.data(), val.data(), x.data(), sh.C * hw, sh.R,
                       hw, geo.bits.data(), sh.kh * sh.kw, b, want.data(), 0, sh.N * sh.R);
      check_cuda(cuda::sparse_conv(ptr.data(), idx.data(), val.data(), x.data(), sh.N, sh.C, sh.H, sh.W,
                                   sh.kh, sh.kw, b, got.data(), sh.R, nullptr),
                 "sparse_conv launch");
      bool ok = true;
      for (size_t i = 0; i < want.size(); ++i) ok &= std::fabs(got[i] - want[i]) <= 1e-5f * (1 + std::fabs(want[i]));
      check(ok, "sparse_conv " + name + (with_bias ? " bias" : ""));
    }
    std::vector<float> want(sh.R * cols), got(want.size(), -7.f);
    ref->sampled_conv_planes(ptr.data(), idx.data(), geo.off.data(), geo.tap.data(), dy.data(), x.data(),
                             sh.N, sh.C * hw, sh.R, hw, geo.bits.data(), sh.kh * sh.kw, cols, want.data(),
                             0, sh.R);
    check_cuda(cuda::sampled_conv(ptr.data(), idx.data(), dy.data(), x.data(), sh.N, sh.C, sh.H, sh.W,
                                  sh.kh, sh.kw, sh.R, got.data(), nullptr),
               "sampled_conv launch");
    bool ok = true;
    for (size_t i = 0; i < want.size(); ++i) ok &= std::fabs(got[i] - want[i]) <= 1e-4f * (1 + std::fabs(want[i]));
    check(ok, "sampled_conv " + name);
  }
}

int main() {
  test_launch_limits();
  test_histograms<float>();
  test_histograms<Half>();
  test_histograms<BFloat16>();
  test_update_masks<float>();
  test_update_masks<Half>();
  test_update_masks<BFloat16>();
  test_nm_masks<float>();
  test_nm_masks<Half>();
  test_nm_masks<BFloat16>();
  test_masked_weight<float>();
  test_masked_weight<Half>();
  test_masked_weight<BFloat16>();
  for (const auto& dev : kDevices) {
    test_sgd<float>(dev, std::to_string(dev.num_sms) + " SMs");
  }
  for (const auto& dev : kDevices) test_adamw<float>(dev, std::to_string(dev.num_sms) + " SMs");
  test_adamw<BFloat16>(kDevices[1], "3 SMs");
  test_sgd<Half>(kDevices[1], "3 SMs");
  test_sgd<BFloat16>(kDevices[1], "3 SMs");
  test_gpu_classes<float>();
  test_gpu_classes<Half>();
  test_sparse_products();
  test_sparse_convolution();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
