// XLA FFI handlers of the native ConvContract and the Python module that hands them to JAX.
//
// Targets (registered by kernels/native/_ffi.py with platform="cpu"):
//   ginjax_native_forward_{f32,f64}:     args X blocks..., w per pair...; rets output blocks...
//   ginjax_native_weight_grad_{f32,f64}: args X blocks..., G per output key...; rets dw per pair...
// Every operand has the same leading batch axes (ffi_call's vmap_method="broadcast_all").
// Work runs on XLA's intra-op thread pool: the threads XLA was given for this computation.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "conv_contract.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;
using ginjax_native::Plan;

namespace {

// Runs fn over [0, n) on the caller thread and up to num_threads pool tasks, which pull items
// from a shared counter. The caller waits only for items that were claimed, never for a task to
// start, so a busy pool (say, two of these calls at once on two threads) cannot deadlock it.
struct ForState {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  std::mutex mutex;
  std::condition_variable finished;

  void work() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      (*fn)(i);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

ginjax_native::ParallelFor pool_runner(ffi::ThreadPool& pool) {
  return [&pool](int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    auto state = std::make_shared<ForState>();
    state->n = n;
    state->fn = &fn;
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
    for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->work(); });
    state->work();
    std::unique_lock<std::mutex> lock(state->mutex);
    state->finished.wait(lock, [&] { return state->done.load() == n; });
  };
}

template <typename S>
std::string decode_plan(Plan& plan, S geom, S tables, S keys, S pairs, S rows, S entries,
                        ffi::Span<const double> values) {
  return plan.decode(geom.begin(), geom.size(), tables.begin(), tables.size(), keys.begin(), keys.size(),
                     pairs.begin(), pairs.size(), rows.begin(), rows.size(), entries.begin(), entries.size(),
                     values.begin(), values.size());
}

// The leading (batch) elements of a buffer whose trailing dims must be `tail`; -1 if they are not.
int64_t batch_of(const ffi::AnyBuffer& buf, const std::vector<int64_t>& tail) {
  auto dims = buf.dimensions();
  if (dims.size() < tail.size()) return -1;
  const size_t lead = dims.size() - tail.size();
  int64_t batch = 1;
  for (size_t d = 0; d < dims.size(); ++d) {
    if (d < lead)
      batch *= dims[d];
    else if (dims[d] != tail[d - lead])
      return -1;
  }
  return batch;
}

std::vector<int64_t> block_tail(const Plan& p, const ginjax_native::Key& key, const int64_t* spatial) {
  std::vector<int64_t> tail{key.channels};
  for (int ax = 0; ax < p.D; ++ax) tail.push_back(spatial[ax]);
  for (int64_t c = key.comps; c > 1; c /= p.D) tail.push_back(p.D);
  return tail;
}

std::vector<int64_t> weight_tail(const Plan& p, size_t t) {
  const auto& pair = p.pairs[t];
  return {p.out_keys[pair.out_key].channels, p.in_keys[pair.in_key].channels, pair.filters};
}

template <typename T>
constexpr ffi::DataType dtype_of() {
  return sizeof(T) == 4 ? ffi::DataType::F32 : ffi::DataType::F64;
}

// Checks and collects the operands: `first` from args [0, n_first), `second` from the rest,
// results from rets; each list's expected trailing dims given. Returns "" or the problem.
template <typename T>
std::string collect(ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                    const std::vector<std::vector<int64_t>>& first_tails,
                    const std::vector<std::vector<int64_t>>& second_tails,
                    const std::vector<std::vector<int64_t>>& ret_tails, std::vector<const T*>& first,
                    std::vector<const T*>& second, std::vector<T*>& outs, int64_t& batch) {
  const size_t n_first = first_tails.size();
  if (args.size() != n_first + second_tails.size() || rets.size() != ret_tails.size())
    return "wrong number of operands or results for the layer";
  batch = -1;
  auto check = [&](const ffi::AnyBuffer& buf, const std::vector<int64_t>& tail, const char* what,
                   size_t index) -> std::string {
    if (buf.element_type() != dtype_of<T>()) return std::string(what) + " " + std::to_string(index) + " has the wrong dtype";
    const int64_t b = batch_of(buf, tail);
    if (b < 0 || (batch >= 0 && b != batch))
      return std::string(what) + " " + std::to_string(index) + " has the wrong shape";
    batch = b;
    return "";
  };
  for (size_t i = 0; i < args.size(); ++i) {
    auto buf = args.get<ffi::AnyBuffer>(i);
    if (!buf.has_value()) return "operand " + std::to_string(i) + " is not a buffer";
    const bool is_first = i < n_first;
    std::string err = check(*buf, is_first ? first_tails[i] : second_tails[i - n_first], "operand", i);
    if (!err.empty()) return err;
    (is_first ? first : second).push_back(reinterpret_cast<const T*>(buf->untyped_data()));
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buf = rets.get<ffi::AnyBuffer>(i);
    if (!buf.has_value()) return "result " + std::to_string(i) + " is not a buffer";
    std::string err = check(**buf, ret_tails[i], "result", i);
    if (!err.empty()) return err;
    outs.push_back(reinterpret_cast<T*>((*buf)->untyped_data()));
  }
  return "";
}

using I64 = ffi::Span<const int64_t>;

template <typename T, bool kWeightGrad>
ffi::Error run(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, I64 geom, I64 tables,
               I64 keys, I64 pairs, I64 rows, I64 entries, ffi::Span<const double> values) {
  Plan plan;
  std::string err = decode_plan(plan, geom, tables, keys, pairs, rows, entries, values);
  if (!err.empty()) return ffi::Error::InvalidArgument("ginjax native ConvContract: " + err);
  std::vector<std::vector<int64_t>> xs_tails, outs_tails, w_tails;
  for (const auto& k : plan.in_keys) xs_tails.push_back(block_tail(plan, k, plan.n_in));
  for (const auto& k : plan.out_keys) outs_tails.push_back(block_tail(plan, k, plan.n_out));
  for (size_t t = 0; t < plan.pairs.size(); ++t) w_tails.push_back(weight_tail(plan, t));
  std::vector<const T*> xs, second;
  std::vector<T*> outs;
  int64_t batch = 0;
  err = kWeightGrad ? collect<T>(args, rets, xs_tails, outs_tails, w_tails, xs, second, outs, batch)
                    : collect<T>(args, rets, xs_tails, w_tails, outs_tails, xs, second, outs, batch);
  if (!err.empty()) return ffi::Error::InvalidArgument("ginjax native ConvContract: " + err);
  if (batch == 0) return ffi::Error::Success();
  auto runner = pool_runner(pool);
  if (kWeightGrad)
    ginjax_native::weight_grad<T>(plan, batch, xs, second, outs, runner);
  else
    ginjax_native::forward<T>(plan, batch, xs, second, outs, runner);
  return ffi::Error::Success();
}

#define GINJAX_BIND()                        \
  ffi::Ffi::Bind()                           \
      .Ctx<ffi::ThreadPool>()                \
      .RemainingArgs()                       \
      .RemainingRets()                       \
      .Attr<I64>("geom")                     \
      .Attr<I64>("tables")                   \
      .Attr<I64>("keys")                     \
      .Attr<I64>("pairs")                    \
      .Attr<I64>("rows")                     \
      .Attr<I64>("entries")                  \
      .Attr<ffi::Span<const double>>("values")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ForwardF32, (run<float, false>), GINJAX_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ForwardF64, (run<double, false>), GINJAX_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(WeightGradF32, (run<float, true>), GINJAX_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(WeightGradF64, (run<double, true>), GINJAX_BIND());

template <typename F>
nb::capsule capsule(F* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_ginjax_native, m) {
  m.doc() = "XLA FFI handlers of the native (CPU) ConvContract";
  m.def("registrations", []() {
    nb::dict d;
    d["ginjax_native_forward_f32"] = capsule(ForwardF32);
    d["ginjax_native_forward_f64"] = capsule(ForwardF64);
    d["ginjax_native_weight_grad_f32"] = capsule(WeightGradF32);
    d["ginjax_native_weight_grad_f64"] = capsule(WeightGradF64);
    return d;
  });
}
