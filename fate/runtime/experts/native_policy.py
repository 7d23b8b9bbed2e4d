"""The offloading policy's decode hot paths in C++, compiled into the copier's extension (:mod:`.copier`
builds it; its ``rank_topn()`` and ``value_plan()`` hand them out, or None where it is not built).

* ``rank_topn``: the one-token prediction (:mod:`.prefetch`): the stacked routers' product and each layer's
  top experts in one call;
* ``value_plan``: the value rule's prefetch decisions (:mod:`.offload`), the same arithmetic in the same
  order as its Python reference :func:`fate.runtime.experts.offload.value_plan`, which serves where the
  extension is not built; a test holds the two equal.

Plain functions of their arguments: they read no cache and queue no copy.
"""

SOURCE = r"""
// The one-token prediction (fate.runtime.experts.prefetch): scores = W x for the stacked routers W
// [groups * E, H] (float32, row-major) and x [H], then each group's top n experts by score, ties to the
// lower id (numpy's stable argsort of -scores) — one call instead of a product, a sort and their copies.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void scores_of(const float* W, const float* x, int64_t rows, int64_t H, float* s) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = W + r * H;
    float acc[16] = {0};
    int64_t h = 0;
    for (; h + 16 <= H; h += 16)
      for (int i = 0; i < 16; ++i) acc[i] += w[h + i] * x[h + i];
    float t = 0;
    for (; h < H; ++h) t += w[h] * x[h];
    for (int i = 0; i < 16; ++i) t += acc[i];
    s[r] = t;
  }
}

static std::vector<std::vector<int64_t>> rank_topn(int64_t w_ptr, int64_t x_ptr, int64_t groups, int64_t E,
                                                   int64_t H, int64_t n) {
  const float* W = (const float*)w_ptr;
  const float* x = (const float*)x_ptr;
  std::vector<float> s(groups * E);
  scores_of(W, x, groups * E, H, s.data());
  n = std::min(n, E);
  std::vector<std::vector<int64_t>> out(groups);
  std::vector<int64_t> idx(E);
  for (int64_t g = 0; g < groups; ++g) {
    const float* sg = s.data() + g * E;
    for (int64_t e = 0; e < E; ++e) idx[e] = e;
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                      [sg](int64_t a, int64_t b) { return sg[a] > sg[b] || (sg[a] == sg[b] && a < b); });
    out[g].assign(idx.begin(), idx.begin() + n);
  }
  return out;
}


// The value rule's decisions for one decode step: the same arithmetic, in the same order, as its Python
// reference ``value_plan`` (fate.runtime.experts.offload, which documents the arguments): the predictions
// (their layer, ahead, experts and chances) and the cache (slot_of, pending, free_slots(j), resident(j))
// are read in place, a few items each: converting them to C++ containers cost more than the rule itself.
// Returns [(layer, expert, victim, chance), ...]: victim -1 a free slot, else the expert whose slot it takes.
namespace py = pybind11;

static inline int64_t int_at(PyObject* list, Py_ssize_t i) { return PyLong_AsLongLong(PyList_GET_ITEM(list, i)); }

static py::list value_plan(int64_t layer, int64_t k, double now, double link_free, double t_layer, double t_copy,
                           double host, const py::list& preds, const py::object& cache) {
  struct Pred { int64_t layer; py::list experts, chances, slot_of, pending; };
  struct Cand { double p; size_t i; int64_t e; };
  const size_t P = preds.size();
  py::list all_slots = cache.attr("slot_of"), all_pending = cache.attr("pending");
  std::vector<Pred> pr;
  pr.reserve(P);
  std::vector<Cand> cands;
  cands.reserve(32);
  double next_misses = 0.0;
  for (size_t i = 0; i < P; ++i) {
    py::handle q = preds[i];
    int64_t j = q.attr("layer").cast<int64_t>();
    pr.push_back({j, q.attr("experts"), q.attr("chances"), all_slots[j], all_pending[j]});
    PyObject *ex = pr[i].experts.ptr(), *ch = pr[i].chances.ptr(), *so = pr[i].slot_of.ptr();
    const Py_ssize_t n = PyList_GET_SIZE(ex);
    TORCH_CHECK(PyList_GET_SIZE(ch) == n, "value_plan: one chance an expert");
    double held = 0.0;
    for (Py_ssize_t r = 0; r < n; ++r) {
      int64_t e = int_at(ex, r);
      double p = PyFloat_AsDouble(PyList_GET_ITEM(ch, r));
      TORCH_CHECK(e >= 0 && e < PyList_GET_SIZE(so), "value_plan: expert out of range");
      if (int_at(so, e) >= 0) held += p;
      else if (p > 0.0) cands.push_back({p, i, e});
    }
    if (q.attr("ahead").cast<int64_t>() == 1) next_misses = std::max(0.0, (double)k - held);
  }
  py::list out;
  if (cands.empty()) return out;
  std::stable_sort(cands.begin(), cands.end(), [](const Cand& a, const Cand& b) { return a.p > b.p; });
  const double t_next = now + t_layer;
  std::vector<int64_t> free(P, -1);  // -1: not asked yet
  std::vector<std::vector<std::pair<double, int64_t>>> victims(P);  // settled experts, the least likely first
  std::vector<size_t> taken(P, 0);
  std::vector<bool> built(P, false);
  for (const Cand& cd : cands) {
    const Pred& q = pr[cd.i];
    const int64_t j = q.layer;
    const double finish = link_free + t_copy;
    const double t_need = t_next + (double)(j - layer - 1) * t_layer;
    const double overrun = std::max(0.0, finish - t_next) - std::max(0.0, link_free - t_next);
    if (overrun > 0.0 && t_next + t_copy <= t_need) continue;
    const double saved = cd.p * (t_copy - std::max(0.0, finish - t_need));
    const double cost = std::max(0.0, next_misses - (j == layer + 1 ? cd.p : 0.0)) * overrun + host;
    if (saved <= cost) continue;
    if (free[cd.i] < 0) free[cd.i] = cache.attr("free_slots")(j).cast<int64_t>();
    int64_t victim = -1;
    if (free[cd.i] == 0) {
      auto& v = victims[cd.i];
      if (!built[cd.i]) {
        built[cd.i] = true;
        py::list od = cache.attr("resident")(j);
        PyObject *so = q.slot_of.ptr(), *pd = q.pending.ptr(), *ex = q.experts.ptr(), *ch = q.chances.ptr();
        for (Py_ssize_t a = 0; a < PyList_GET_SIZE(od.ptr()); ++a) {
          int64_t x = int_at(od.ptr(), a);
          int64_t s = int_at(so, x);
          if (s < 0 || PyObject_IsTrue(PyList_GET_ITEM(pd, s))) continue;
          double px = 0.0;
          for (Py_ssize_t r = 0; r < PyList_GET_SIZE(ex); ++r)
            if (int_at(ex, r) == x) { px = PyFloat_AsDouble(PyList_GET_ITEM(ch, r)); break; }
          v.emplace_back(px, x);
        }
        std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      if (taken[cd.i] >= v.size()) continue;
      if (saved <= cost + v[taken[cd.i]].first * t_copy) continue;
      victim = v[taken[cd.i]++].second;
    } else {
      --free[cd.i];
    }
    out.append(py::make_tuple(j, cd.e, victim, cd.p));
    link_free = finish;
    if (j == layer + 1) next_misses = std::max(0.0, next_misses - cd.p);
  }
  return out;
}
"""
