"""The offloading policy's decode hot paths in C++, compiled into the copier's extension (:mod:`.copier`
builds it; its ``rank_topn()``, ``value_plan()``, ``value_planner()`` and ``queuer()`` hand them out, or None
where it is not built).

* ``rank_topn``: the one-token prediction (:mod:`.prefetch`): the stacked routers' product and each layer's
  top experts in one call;
* ``value_plan``: the value rule's prefetch decisions (:mod:`.offload`), the same arithmetic in the same
  order as its Python reference :func:`fate.runtime.experts.offload.value_plan`, which serves where the
  extension is not built; a test holds the two equal;
* ``ValuePlanner``: the two in one call for one layer, fate's decode hot path
  (:meth:`.prefetch.Predictor.value_planner`), which with a ``Queuer`` also queues what it decided;
* ``Queuer``: the cache's and the transfer's hot operations (reserve, drop, a copy queued, copied inline or
  cancelled) made in place on the cache's own lists and the native copier, the same list operations in the
  same order as the Python (:meth:`.transfer.TransferEngine.native_queue` makes one); what the planner's
  queueing and the native decode step (:mod:`.native_step`) run.

The prediction and the rule read the cache (in place: a Python list item is cheaper to read than to convert)
and change nothing; the ``Queuer`` changes it.
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

// each group's top n experts (ties to the lower id) into out[g]
static void top_n(const float* W, const float* x, int64_t groups, int64_t E, int64_t H, int64_t n,
                  std::vector<std::vector<int64_t>>& out) {
  std::vector<float> s(groups * E);
  scores_of(W, x, groups * E, H, s.data());
  n = std::min(n, E);
  out.assign(groups, {});
  std::vector<int64_t> idx(E);
  for (int64_t g = 0; g < groups; ++g) {
    const float* sg = s.data() + g * E;
    for (int64_t e = 0; e < E; ++e) idx[e] = e;
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                      [sg](int64_t a, int64_t b) { return sg[a] > sg[b] || (sg[a] == sg[b] && a < b); });
    out[g].assign(idx.begin(), idx.begin() + n);
  }
}

static std::vector<std::vector<int64_t>> rank_topn(int64_t w_ptr, int64_t x_ptr, int64_t groups, int64_t E,
                                                   int64_t H, int64_t n) {
  std::vector<std::vector<int64_t>> out;
  top_n((const float*)w_ptr, (const float*)x_ptr, groups, E, H, n, out);
  return out;
}

// The value rule's decisions for one decode step: the same arithmetic, in the same order, as its Python
// reference ``value_plan`` (fate.runtime.experts.offload, which documents the arguments): the predictions
// (their layer, ahead, experts and chances) and the cache (slot_of, pending, free_slots(j), resident(j))
// are read in place, a few items each: converting them to C++ containers cost more than the rule itself.
// Returns [(layer, expert, victim, chance), ...]: victim -1 a free slot, else the expert whose slot it takes.
namespace py = pybind11;

static inline int64_t int_at(PyObject* list, Py_ssize_t i) { return PyLong_AsLongLong(PyList_GET_ITEM(list, i)); }

struct PredView {  // one prediction: its layer, distance, ranked experts and their chances (one per expert)
  int64_t layer, ahead;
  std::vector<int64_t> experts;
  const double* chances;  // experts.size() of them, owned by the caller for the call
};

// a list of floats as doubles (once: reading a list's float objects in the hot path costs a cache line each)
static std::vector<double> doubles_of(PyObject* list) {
  TORCH_CHECK(PyList_Check(list), "value_plan: the chances are a list of floats");
  std::vector<double> out((size_t)PyList_GET_SIZE(list));
  for (size_t r = 0; r < out.size(); ++r) out[r] = PyFloat_AsDouble(PyList_GET_ITEM(list, (Py_ssize_t)r));
  if (PyErr_Occurred()) throw py::error_already_set();
  return out;
}

// what value_core reads of the cache: its per-layer lists (the outer lists never change) and how many slots
// are free and which experts are resident in eviction order — of an ExpertCache straight from its free lists
// and its policies (len(_free[j]), policies[j].resident(): ExpertCache.free_slots and resident without their
// Python frames), of anything else through its free_slots(j) and resident(j) methods
struct CacheView {
  py::list slot_of, pending;
  py::object free_slots, resident, free_lists, policies;
  explicit CacheView(const py::object& cache)
      : slot_of(cache.attr("slot_of")), pending(cache.attr("pending")), free_slots(cache.attr("free_slots")),
        resident(cache.attr("resident")) {
    if (py::hasattr(cache, "_free") && py::hasattr(cache, "policies")) {
      free_lists = cache.attr("_free");
      policies = cache.attr("policies");
    }
  }
  int64_t n_free(int64_t j) const {
    if (free_lists) return PyList_GET_SIZE(PyList_GET_ITEM(free_lists.ptr(), j));
    return free_slots(j).cast<int64_t>();
  }
  py::list resident_in_order(int64_t j) const {
    if (policies) return policies[py::int_(j)].attr("resident")();
    return resident(j);
  }
};

static py::list value_core(int64_t layer, int64_t k, double now, double link_free, double t_layer, double t_copy,
                           double host, const std::vector<PredView>& preds, const CacheView& cache) {
  struct Cand { double p; size_t i; int64_t e; };
  const size_t P = preds.size();
  const py::list &all_slots = cache.slot_of, &all_pending = cache.pending;
  std::vector<py::list> slot_of, pending;
  std::vector<Cand> cands;
  cands.reserve(32);
  double next_misses = 0.0;
  for (size_t i = 0; i < P; ++i) {
    const PredView& q = preds[i];
    slot_of.push_back(all_slots[q.layer]);
    pending.push_back(all_pending[q.layer]);
    PyObject* so = slot_of[i].ptr();
    double held = 0.0;
    for (size_t r = 0; r < q.experts.size(); ++r) {
      int64_t e = q.experts[r];
      double p = q.chances[r];
      TORCH_CHECK(e >= 0 && e < PyList_GET_SIZE(so), "value_plan: expert out of range");
      if (int_at(so, e) >= 0) held += p;
      else if (p > 0.0) cands.push_back({p, i, e});
    }
    if (q.ahead == 1) next_misses = std::max(0.0, (double)k - held);
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
    const PredView& q = preds[cd.i];
    const int64_t j = q.layer;
    const double finish = link_free + t_copy;
    const double t_need = t_next + (double)(j - layer - 1) * t_layer;
    const double overrun = std::max(0.0, finish - t_next) - std::max(0.0, link_free - t_next);
    if (overrun > 0.0 && t_next + t_copy <= t_need) continue;
    const double saved = cd.p * (t_copy - std::max(0.0, finish - t_need));
    const double cost = std::min(1.0, std::max(0.0, next_misses - (j == layer + 1 ? cd.p : 0.0))) * overrun + host;
    if (saved <= cost) continue;
    if (free[cd.i] < 0) free[cd.i] = cache.n_free(j);
    int64_t victim = -1;
    if (free[cd.i] == 0) {
      auto& v = victims[cd.i];
      if (!built[cd.i]) {
        built[cd.i] = true;
        py::list od = cache.resident_in_order(j);
        PyObject *so = slot_of[cd.i].ptr(), *pd = pending[cd.i].ptr();
        for (Py_ssize_t a = 0; a < PyList_GET_SIZE(od.ptr()); ++a) {
          int64_t x = int_at(od.ptr(), a);
          int64_t s = int_at(so, x);
          if (s < 0 || PyObject_IsTrue(PyList_GET_ITEM(pd, s))) continue;
          double px = 0.0;
          for (size_t r = 0; r < q.experts.size(); ++r)
            if (q.experts[r] == x) { px = q.chances[r]; break; }
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

// value_plan over Prediction objects (their layer, ahead, experts, chances attributes)
static py::list value_plan(int64_t layer, int64_t k, double now, double link_free, double t_layer, double t_copy,
                           double host, const py::list& preds, const py::object& cache) {
  std::vector<PredView> views;
  std::vector<std::vector<double>> chances;  // the views' chances, alive for the call
  chances.reserve(py::len(preds));
  for (py::handle q : preds) {
    py::list ex = q.attr("experts");
    py::object ch = q.attr("chances");
    chances.push_back(doubles_of(ch.ptr()));
    PredView v{q.attr("layer").cast<int64_t>(), q.attr("ahead").cast<int64_t>(), {}, chances.back().data()};
    for (py::handle e : ex) v.experts.push_back(e.cast<int64_t>());
    TORCH_CHECK(v.experts.size() == chances.back().size(), "value_plan: one chance an expert");
    views.push_back(std::move(v));
  }
  return value_core(layer, k, now, link_free, t_layer, t_copy, host, views, CacheView(cache));
}

// The cache's and the transfer's hot operations on the cache's own lists, made in place with the same list
// operations in the same order as their Python originals (ExpertCache.reserve / drop, TransferEngine.prefetch /
// demand / promote / cancel), the copies submitted to the native copier (the class above, in the same
// extension): what the value rule's queueing (``queue``: Offloader._queue_planned, its reference) and the native
// decode step (native_step) run, one call where the Python made a few per copy.  Built by
// TransferEngine.native_queue, which hands over its slot buffers' addresses, its ticket maps and the bytes
// counter; ``queued``: the Offloader's per-layer lists of slots holding a queued prefetch.
static PyObject* py_name(const char* s) {  // an interned method name, made once
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw py::error_already_set();
  return o;
}

class Queuer {
 public:
  Queuer(py::object cache, py::object copier, std::vector<int64_t> bases, int64_t slot_bytes, py::list tickets,
         py::object moved, py::object blob_address, py::object precision, py::list queued)
      : copier_obj_(copier), copier_(copier.cast<Copier*>()), bases_(std::move(bases)),
        slot_bytes_(slot_bytes), tickets_(tickets), moved_(moved), blob_address_(blob_address),
        precision_(precision), queued_(queued), slot_of_(cache.attr("slot_of")), expert_at_(cache.attr("expert_at")),
        precision_at_(cache.attr("precision_at")), pending_(cache.attr("pending")),
        prefetched_(cache.attr("prefetched")), gen_(cache.attr("gen")), free_(cache.attr("_free")),
        policies_(cache.attr("policies")), evictions_(cache.attr("evictions")), on_evict_(cache.attr("on_evict")),
        blobs_(py::len(slot_of_)) {
    TORCH_CHECK((int64_t)bases_.size() == (int64_t)py::len(slot_of_) && py::len(tickets_) == py::len(slot_of_) &&
                    py::len(queued_) == py::len(slot_of_),
                "Queuer: one slot buffer, ticket map and queued list a layer");
    static PyObject *admit = py_name("admit"), *discard = py_name("discard"), *evict_where = py_name("evict_where");
    admit_ = admit, discard_ = discard, evict_where_ = evict_where;
  }

  // the value rule's decisions [(layer, expert, victim, chance), ...] of value_core, in order
  void queue(const py::list& decisions) {
    for (py::handle d : decisions) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(d);
      const int64_t j = t[0].cast<int64_t>(), e = t[1].cast<int64_t>(), victim = t[2].cast<int64_t>();
      TORCH_CHECK(victim >= 0 || PyList_GET_SIZE(list_at(free_, j)) > 0, "Queuer: no free slot and no victim");
      const int64_t slot = reserve(j, e, victim, true, nullptr);
      submit(j, slot, e, 2.0 - t[3].cast<double>());  // the likelier first, all behind any demand load
      if (PyList_Append(list_at(queued_, j), py::int_(slot).ptr()) < 0) throw py::error_already_set();
    }
  }

  // ExpertCache.reserve: a free slot, else ``victim``'s (>= 0) or the one the policy evicts (victim < 0: never
  // one in ``pinned`` — a Python container, or nullptr: none — nor one in flight); -1 when none can be had
  int64_t reserve(int64_t j, int64_t e, int64_t victim, bool prefetched, PyObject* pinned) {
    TORCH_CHECK(has_slots(j), "Queuer: layer ", j, " has no slots");
    PyObject *so = list_at(slot_of_, j), *free = list_at(free_, j);
    TORCH_CHECK(e >= 0 && e < PyList_GET_SIZE(so), "Queuer: expert out of range");
    TORCH_CHECK(int_at(so, e) < 0, "layer ", j, ": expert ", e, " is already cached");
    PyObject* policy = list_at(policies_, j);
    int64_t slot;
    if (PyList_GET_SIZE(free) > 0) {  // free.pop()
      Py_ssize_t last = PyList_GET_SIZE(free) - 1;
      slot = int_at(free, last);
      if (PyList_SetSlice(free, last, last + 1, nullptr) < 0) throw py::error_already_set();
    } else {
      if (victim < 0) {
        py::object got = steal(PyObject_CallMethodObjArgs(policy, evict_where_, py::int_(e).ptr(),
                                                          pinned ? pinned : empty_.ptr(), list_at(pending_, j), so,
                                                          nullptr));
        if (got.is_none()) return -1;
        victim = got.cast<int64_t>();
      } else {
        TORCH_CHECK(victim < PyList_GET_SIZE(so) && int_at(so, victim) >= 0, "Queuer: the victim is not resident");
        steal(PyObject_CallMethodOneArg(policy, discard_, py::int_(victim).ptr()));
      }
      slot = int_at(so, victim);
      set(so, victim, PyLong_FromLongLong(-1));
      PyObject* ev = evictions_.ptr();
      set(ev, j, PyLong_FromLongLong(int_at(ev, j) + 1));
      if (!on_evict_.is_none()) on_evict_(j);
    }
    steal(PyObject_CallMethodOneArg(policy, admit_, py::int_(e).ptr()));
    set(so, e, PyLong_FromLongLong(slot));
    set(list_at(expert_at_, j), slot, PyLong_FromLongLong(e));
    set(list_at(precision_at_, j), slot, precision_.inc_ref().ptr());
    set(list_at(pending_, j), slot, py::bool_(true).release().ptr());
    set(list_at(prefetched_, j), slot, py::bool_(prefetched).release().ptr());
    PyObject* gen = list_at(gen_, j);
    set(gen, slot, PyLong_FromLongLong(int_at(gen, slot) + 1));
    return slot;
  }

  // TransferEngine._push: the copy of expert ``e`` into ``slot`` queued on the copy thread at ``priority``
  void submit(int64_t j, int64_t slot, int64_t e, double priority) {
    const auto& b = blob(j, e);
    int64_t ticket = copier_->submit(b.first, bases_[j] + slot * slot_bytes_, b.second, priority,
                                     py::reinterpret_borrow<py::object>(list_at(pending_, j)), slot, moved_, precision_);
    if (PyDict_SetItem(list_at(tickets_, j), py::int_(slot).ptr(), py::int_(ticket).ptr()) < 0)
      throw py::error_already_set();
  }

  // TransferEngine._copy inline: copied on this thread (on the link's timeline), the flag cleared, the bytes counted
  void copy_now(int64_t j, int64_t slot, int64_t e) {
    const auto& b = blob(j, e);
    copier_->copy_now(b.first, bases_[j] + slot * slot_bytes_, b.second);
    set(list_at(pending_, j), slot, py::bool_(false).release().ptr());
    if (!moved_.is_none()) {
      add_moved(moved_.ptr(), precision_.ptr(), b.second);
      if (PyErr_Occurred()) throw py::error_already_set();
    }
  }

  // TransferEngine.cancel: the slot's queued copy cancelled (true); one on the link or landed is not (false)
  bool cancel(int64_t j, int64_t slot) {
    PyObject* t = PyDict_GetItemWithError(list_at(tickets_, j), py::int_(slot).ptr());
    if (t == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return false;
    }
    return copier_->cancel(PyLong_AsLongLong(t));
  }

  // ExpertCache.drop: forget a resident expert whose copy is not in flight and free its slot
  void drop(int64_t j, int64_t e) {
    PyObject* so = list_at(slot_of_, j);
    const int64_t slot = int_at(so, e);
    if (slot < 0) return;
    set(so, e, PyLong_FromLongLong(-1));
    set(list_at(expert_at_, j), slot, PyLong_FromLongLong(-1));
    set(list_at(pending_, j), slot, py::bool_(false).release().ptr());
    PyObject* gen = list_at(gen_, j);
    set(gen, slot, PyLong_FromLongLong(int_at(gen, slot) + 1));
    steal(PyObject_CallMethodOneArg(list_at(policies_, j), discard_, py::int_(e).ptr()));
    if (PyList_Append(list_at(free_, j), py::int_(slot).ptr()) < 0) throw py::error_already_set();
  }

  Copier* copier() const { return copier_; }
  PyObject* precision() const { return precision_.ptr(); }
  // a layer's lists (borrowed): the cache's, and the Offloader's slots holding a queued prefetch
  PyObject* slot_of(int64_t j) const { return list_at(slot_of_, j); }
  PyObject* expert_at(int64_t j) const { return list_at(expert_at_, j); }
  PyObject* precision_at(int64_t j) const { return list_at(precision_at_, j); }
  PyObject* pending(int64_t j) const { return list_at(pending_, j); }
  PyObject* prefetched(int64_t j) const { return list_at(prefetched_, j); }
  PyObject* queued(int64_t j) const { return list_at(queued_, j); }
  PyObject* policy(int64_t j) const { return list_at(policies_, j); }
  int64_t n_layers() const { return (int64_t)blobs_.size(); }
  bool has_slots(int64_t j) const { return j >= 0 && j < n_layers() && bases_[j] != 0; }

 private:
  static PyObject* list_at(const py::list& l, int64_t j) { return PyList_GET_ITEM(l.ptr(), (Py_ssize_t)j); }
  static py::object steal(PyObject* o) {
    if (o == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(o);
  }
  static void set(PyObject* list, int64_t i, PyObject* v) {  // v: a new reference, stolen
    if (v == nullptr || PyList_SetItem(list, (Py_ssize_t)i, v) < 0) throw py::error_already_set();
  }
  const std::pair<int64_t, int64_t>& blob(int64_t j, int64_t e) {
    auto& blobs = blobs_[j];  // (address, bytes) per expert, asked of the store once (it checks crc32 then)
    if (blobs.empty()) blobs.assign(PyList_GET_SIZE(list_at(slot_of_, j)), {0, -1});
    if (blobs[e].second < 0) {
      py::tuple a = blob_address_(j, e, precision_);
      blobs[e] = {a[0].cast<int64_t>(), a[1].cast<int64_t>()};
    }
    return blobs[e];
  }

  py::object copier_obj_;  // keeps copier_ alive
  Copier* copier_;
  std::vector<int64_t> bases_;  // slot 0 of each layer's buffer (0: no slots)
  int64_t slot_bytes_;
  py::list tickets_;  // per layer: {slot: ticket}
  py::object moved_, blob_address_, precision_;
  py::list queued_;
  py::list slot_of_, expert_at_, precision_at_, pending_, prefetched_, gen_, free_, policies_, evictions_;
  py::object on_evict_;
  PyObject *admit_, *discard_, *evict_where_;
  py::tuple empty_;  // "nothing pinned"
  std::vector<std::vector<std::pair<int64_t, int64_t>>> blobs_;
};

// The one-token prediction and the value rule in one call, fate's decode hot path, for one layer's gate
// input: made once per layer with what does not change between steps (the stacked routers W [groups * E,
// H] of the layers ahead, how many to rank, ``made`` — a list of (layer, ahead, m, chances of ranks < m)
// per layer ahead, the Predictor's — the rule's constants and the cache), then called per step with the
// gate input and the link's clock: the product and ranking as rank_topn, then value_core.
// Returns (the experts named for the next layer or None, the decisions).
class ValuePlanner {
 public:
  // w: the stacked routers, a contiguous float32 CPU tensor [len(made) * E, H], held for the planner's life
  ValuePlanner(torch::Tensor w, int64_t E, int64_t H, int64_t n, py::list made, int64_t layer, int64_t k,
               double t_layer, double t_copy, double host, py::object cache, py::object queuer)
      : w_(std::move(w)), E_(E), H_(H), n_(n), layer_(layer), k_(k), t_layer_(t_layer), t_copy_(t_copy),
        host_(host), cache_(cache), queuer_obj_(queuer),
        queuer_(queuer.is_none() ? nullptr : queuer.cast<Queuer*>()) {
    TORCH_CHECK(w_.scalar_type() == torch::kFloat32 && w_.is_contiguous() && w_.device().is_cpu() &&
                    w_.numel() == (int64_t)made.size() * E * H,
                "ValuePlanner: the routers are a contiguous float32 CPU tensor [layers ahead * E, H]");
    W_ = w_.data_ptr<float>();
    for (py::handle t : made) {
      py::tuple tt = py::reinterpret_borrow<py::tuple>(t);
      TORCH_CHECK(tt.size() == 4 && PyList_Check(tt[3].ptr()), "ValuePlanner: made is (layer, ahead, m, chances)");
      Spec sp{tt[0].cast<int64_t>(), tt[1].cast<int64_t>(), tt[2].cast<int64_t>(), doubles_of(tt[3].ptr())};
      TORCH_CHECK(sp.m <= 0 || (int64_t)sp.chances.size() == sp.m, "ValuePlanner: m chances a layer ahead");
      spec_.push_back(std::move(sp));
    }
  }

  // x: the gate input [1, H]; None where it is not a contiguous float32 CPU tensor (then the caller predicts
  // and decides in two steps)
  py::object operator()(const torch::Tensor& x, double now, double link_free) {
    if (x.scalar_type() != torch::kFloat32 || !x.device().is_cpu() || !x.is_contiguous() || x.numel() != H_)
      return py::none();
    std::vector<std::vector<int64_t>> order;
    top_n(W_, x.data_ptr<float>(), (int64_t)spec_.size(), E_, H_, n_, order);
    std::vector<PredView> views;
    py::object named = py::none();
    for (size_t g = 0; g < spec_.size(); ++g) {
      const Spec& sp = spec_[g];
      if (sp.m <= 0) continue;
      PredView v{sp.layer, sp.ahead,
                 std::vector<int64_t>(order[g].begin(), order[g].begin() + std::min<size_t>(sp.m, order[g].size())),
                 sp.chances.data()};
      if (v.ahead == 1) {
        py::list l;
        for (int64_t e : v.experts) l.append(e);
        named = l;
      }
      views.push_back(std::move(v));
    }
    py::list decisions = value_core(layer_, k_, now, link_free, t_layer_, t_copy_, host_, views, cache_);
    if (queuer_ != nullptr && py::len(decisions) > 0) queuer_->queue(decisions);
    return py::make_tuple(named, decisions);
  }

  bool queues() const { return queuer_ != nullptr; }

 private:
  struct Spec { int64_t layer, ahead, m; std::vector<double> chances; };  // chances: of ranks < m, fixed
  torch::Tensor w_;
  const float* W_ = nullptr;
  int64_t E_, H_, n_, layer_, k_;
  double t_layer_, t_copy_, host_;
  CacheView cache_;
  py::object queuer_obj_;  // keeps queuer_ alive
  Queuer* queuer_;  // queues the decisions itself (else the caller does)
  std::vector<Spec> spec_;
};
"""
