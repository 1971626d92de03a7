"""Proves the emulated CUDA test is not vacuous: each mutation below injects a known kind of
kernel bug into a copy of kernels.cu; the emulated suite must fail (or crash, or hang) on
every one of them. Exits non-zero, naming the survivors, if any mutation passes.

    python mutate.py --kernels csrc/cuda/kernels.cu --driver test_cuda_emulated.o \\
        --cxx g++ --flag=-std=c++17 --flag=-O1 --include csrc/cuda/emulation ...

Bugs the emulation cannot show (each launch runs one fixed interleaving of fibers that never
preempt each other) are not listed: a missing guard barrier at the start of block_sum,
``++bins[i]`` instead of ``atomicAdd`` in shared memory, a non-atomic global flush
(blocks run one after another in serial mode).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emulate import emulate

# (name, text in kernels.cu, replacement); each text must occur exactly once.
MUTATIONS = [
    ("sparse product drops the bias",
     "float acc = bias ? bias[r] : 0.0f;", "float acc = 0.0f;"),
    ("sparse product accumulates into the output",
     "y[b * rows + r] = acc;", "y[b * rows + r] += acc;"),
    ("sparse product reads one entry past the row",
     "for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) acc += val[k]",
     "for (int64_t k = ptr[r]; k <= ptr[r + 1] && k < ptr[rows]; ++k) acc += val[k]"),
    ("sampled product leaves the pruned positions unwritten",
     "for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) row[c] = 0.0f;", ""),
    ("sampled product drops the last batch lane",
     "for (int64_t j = 0; j < B; ++j) acc += dy[j] * x[j];",
     "for (int64_t j = 0; j + 1 < B; ++j) acc += dy[j] * x[j];"),
    ("sampled values drop the last batch lane",
     "for (int64_t b = 0; b < B; ++b) sum += dy[b] * x[b];",
     "for (int64_t b = 0; b + 1 < B; ++b) sum += dy[b] * x[b];"),
    ("sampled values read the next row's gradient",
     "if (ptr[mid] <= k) lo = mid; else hi = mid;",
     "if (ptr[mid] < k) lo = mid; else hi = mid;"),
    ("sparse convolution reads across the plane's left and right edges",
     "if (ih >= 0 && ih < H && iw >= 0 && iw < W) acc",
     "if (ih >= 0 && ih < H) acc"),
    ("sparse convolution drops the bias",
     "float acc = bias != nullptr ? bias[r] : 0.0f;", "float acc = 0.0f;"),
    ("sampled convolution leaves the pruned positions unwritten",
     "for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] = 0.0f;", ""),
    ("sampled convolution skips the last image",
     "for (int64_t n = 0; n < N; ++n)\n        for (int64_t h = 0; h < H; ++h) {",
     "for (int64_t n = 0; n + 1 < N; ++n)\n        for (int64_t h = 0; h < H; ++h) {"),
    ("no barrier after zeroing the shared histogram",
     "for (int i = threadIdx.x; i < kSharedWords<B>; i += blockDim.x) bins[i] = 0;\n      __syncthreads();",
     "for (int i = threadIdx.x; i < kSharedWords<B>; i += blockDim.x) bins[i] = 0;"),
    ("no barrier before flushing the shared histogram",
     "if constexpr (B != Bins::kGlobal) {\n      __syncthreads();\n      for",
     "if constexpr (B != Bins::kGlobal) {\n      for"),
    ("SGD tail loop runs one past the end",
     "for (int64_t i = tail + threadIdx.x; i < s.end; i += blockDim.x)",
     "for (int64_t i = tail + threadIdx.x; i <= s.end; i += blockDim.x)"),
    ("vector count rounded up",
     "const int64_t vectors = (s.end - s.begin) / V;",
     "const int64_t vectors = (s.end - s.begin + V - 1) / V;"),
    ("wrong binary search for a chunk's tensor",
     "if (tab.chunk_start[mid] <= c) lo = mid; else hi = mid;",
     "if (tab.chunk_start[mid] < c) lo = mid; else hi = mid;"),
    ("wrong shuffle offsets",
     "for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);\n  const int lane",
     "for (int o = 8; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);\n  const int lane"),
    ("stats index ignored",
     "atomicAdd(&stats[2 * k], kept);",
     "atomicAdd(&stats[2 * s.t], kept);"),
    ("alignment check removed",
     "if (aligned16(p) && aligned16(g) && (!b || aligned16(b))) {",
     "if (true) {"),
    ("no shared-memory opt-in",
     "cudaError_t err = allow_shared(histogram_high_kernel<T, B>, B);",
     "cudaError_t err = cudaSuccess;"),
    ("the 128 KiB layout on every GPU",
     "if (dev.max_shared_optin >= int(shared_bytes(Bins::kShared32))) return Bins::kShared32;",
     "return Bins::kShared32;"),
    ("16-bit counters flushed too late",
     "constexpr int kChunksPerFlush16 = 65535 / kChunk;",
     "constexpr int kChunksPerFlush16 = 65535 / kChunk + 2;"),
    ("warp sums read where no warp wrote",
     "v = lane < int(blockDim.x >> 5) ? warp_sums[lane] : 0;",
     "v = warp_sums[lane];"),
    ("row key with the element's index, not its column",
     "const long long key = row_key(mag, i - row * len);",
     "const long long key = row_key(mag, i);"),
    ("channel floor forces the wrong column",
     "now = now || key_column(rows.max[s.t][row]) == i - row * len;",
     "now = now || key_column(rows.max[s.t][row]) == i - row * len + 1;"),
    ("AdamW ignores amsgrad's running maximum",
     "T* vmax = hp.amsgrad ? static_cast<T*>(max_exp_avg_sqs[s.t]) : nullptr;",
     "T* vmax = nullptr;"),
    ("AdamW skips the histogram's flush",
     "  if (HIST) first.end();\n}\n\n// One thread per (batch lane",
     "}\n\n// One thread per (batch lane"),
    ("N:M groups read from the wrong stride",
     "nm_group(w + g * m, mk + g * m, n, m, kept, back, bad);",
     "nm_group(w + g * n, mk + g * n, n, m, kept, back, bad);"),
    ("first-pass window off by one bin",
     "const int64_t slot = static_cast<int64_t>(high_bin(mag)) - win_start;",
     "const int64_t slot = static_cast<int64_t>(high_bin(mag)) - win_start + 1;"),
    ("the summarised histogram loses the elements over the window",
     "if (threadIdx.x == 0 && over) atomicAdd(&h.hist[win_start + win.width], over);",
     "if (threadIdx.x == 1 && over) atomicAdd(&h.hist[win_start + win.width], over);"),
    ("the SGD step drops the window",
     "tab, grads, bufs, fresh, masks, outs, hp, hist, rows, window);",
     "tab, grads, bufs, fresh, masks, outs, hp, hist, rows, Window{nullptr, nullptr, 0});"),
    ("update_masks loses the shrink-only rule",
     "bool now = keep(magnitude_bits(w[i]), tau) && (old || !shrink_only);",
     "bool now = keep(magnitude_bits(w[i]), tau);"),
]


def run_one(name, original, new, args, work: Path) -> tuple[str, str]:
    source = Path(args.kernels).read_text()
    if source.count(original) != 1:
        return name, f"the text to mutate occurs {source.count(original)} times"
    folder = work / str(abs(hash(name)))
    folder.mkdir()
    mutated = folder / "kernels.cu"
    mutated.write_text(source.replace(original, new))
    cpp = folder / "kernels.emulated.cpp"
    cpp.write_text(emulate(mutated))
    obj, exe = folder / "kernels.o", folder / "test"
    includes = [f"-I{d}" for d in args.include] + [f"-I{Path(args.kernels).parent.resolve()}"]
    build = subprocess.run([args.cxx, *args.flag, *includes, "-c", str(cpp), "-o", str(obj)],
                           capture_output=True, text=True)
    if build.returncode:
        return name, "caught (does not compile)"
    link = subprocess.run([args.cxx, *args.flag, str(obj), *args.driver, "-o", str(exe)],
                          capture_output=True, text=True)
    if link.returncode:
        return name, f"link failed: {link.stderr[-500:]}"
    env = dict(os.environ, DPF_EMU_FAIL_FAST="1")
    try:
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return name, "caught (hangs)"
    if run.returncode == 0:
        return name, "SURVIVED"
    return name, "caught" if run.returncode == 1 else f"caught (exit {run.returncode})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", required=True)
    p.add_argument("--driver", action="append", required=True,
                   help="an object file of the compiled test driver (repeatable)")
    p.add_argument("--cxx", default="c++")
    p.add_argument("--flag", action="append", default=[])
    p.add_argument("--include", action="append", default=[])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda m: run_one(*m, args, Path(tmp)), MUTATIONS))
    bad = 0
    for name, outcome in results:
        print(f"{outcome:28s} {name}")
        bad += not outcome.startswith("caught")
    print(f"{len(results) - bad} of {len(results)} injected bugs caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
