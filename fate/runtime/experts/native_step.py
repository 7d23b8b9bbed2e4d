"""fate's decode step for one MoE layer in C++, compiled into the copier's extension (:mod:`.copier` builds
it; its ``decode_step()`` hands the class out, or None where it is not built).

One call per layer and decode token does what :meth:`.offload.Offloader.run_layer` does before the layer's
experts are computed — its reference, which serves prefill, the paper's window rule, the trace simulator, a
step whose cache holds another precision than decode's (a prefill's INT2 copies), and any run without the
extension:

1. settle the copies landed since (:meth:`.transfer.TransferEngine.poll`);
2. cancel the layer's queued prefetches it does not need (``Offloader._cancel_unneeded``);
3. classify the router's experts: hits, late prefetches (promoted: copied at once), misses (a slot reserved
   — evicting by the layer's policy, never one of these experts nor one in flight — and a demand load);
4. the value rule's clock, and — where ``Offloader._prediction_clocks`` says a prediction can lead anywhere
   — the layer's :class:`ValuePlanner` (prediction, decisions, and their queueing) in the same call;
5. where every expert has its slot, their uses told to the layer's eviction policy (``ExpertCache.touch``:
   the Python makes them as it computes each, and nothing in between touches that policy).

The cache's lists are changed in place through the planner's :class:`Queuer` (:mod:`.native_policy`), with
the same list operations in the same order as the Python; tests/test_offload.py holds a run of random steps
equal to the reference's, state for state.  The experts are then computed by the caller, as before.
"""

SOURCE = r"""
// fate's decode step for one MoE layer (see native_step.py): the part of Offloader.run_layer before the
// experts are computed, for a one-token step under the value rule or plain caching.
class DecodeStep {
 public:
  // inline_demand: a demand load of the decode precision is copied on this thread (transfer.copies_inline);
  // expert_seconds, t_layer, t_copy: the Offloader's; predicts: per layer, whether it predicts at its gate input (_predicts_at[1:])
  DecodeStep(py::object queuer, bool inline_demand, double expert_seconds, double t_layer, double t_copy,
             std::vector<bool> predicts, int64_t n_layers)
      : queuer_obj_(queuer), q_(queuer.cast<Queuer*>()), inline_(inline_demand), expert_s_(expert_seconds),
        t_layer_(t_layer), t_copy_(t_copy), predicts_(std::move(predicts)), n_layers_(n_layers), hit_(py_name("hit")) {
    TORCH_CHECK((int64_t)predicts_.size() == n_layers_, "DecodeStep: one predicts flag per layer");
  }

  // ranked: the router's experts (a list); planner: the layer's ValuePlanner (queueing its own decisions) or
  // None; x: the gate input.  Returns None, having changed nothing, where a slot of these experts holds
  // another precision (the caller runs the Python step); else (order, waiting, hits, late, misses, stall,
  // clocks, named): order [(expert, slot), ...] the hits then the loads (each one's use already told to the
  // layer's policy where none waits: ExpertCache.touch), waiting the experts that got no slot yet, stall the seconds the loads took on this thread, clocks (now, link_free) where a prediction
  // is wanted that the planner could not make (the caller predicts and decides), named the experts the
  // planner named for the next layer (or None).
  py::object operator()(int64_t layer, const py::list& ranked, const py::object& planner, const py::object& x) {
    Queuer& q = *q_;
    TORCH_CHECK(q.has_slots(layer), "DecodeStep: layer ", layer, " has no slots");
    PyObject *so = q.slot_of(layer), *pd = q.pending(layer), *pa = q.precision_at(layer);
    PyObject *ea = q.expert_at(layer), *pf = q.prefetched(layer), *rk = ranked.ptr();
    const Py_ssize_t K = PyList_GET_SIZE(rk);
    for (Py_ssize_t k = 0; k < K; ++k) {  // another precision in play: the Python step, which upgrades it
      const int64_t e = int_at(rk, k);
      TORCH_CHECK(e >= 0 && e < PyList_GET_SIZE(so), "DecodeStep: expert out of range");
      const int64_t s = int_at(so, e);
      if (s >= 0) {
        PyObject* p = PyList_GET_ITEM(pa, s);
        if (p != q.precision() && PyUnicode_Compare(p, q.precision()) != 0) return py::none();
      }
    }
    Copier& c = *q.copier();
    c.settle();
    PyObject* queued = q.queued(layer);
    if (PyList_GET_SIZE(queued) > 0) {  // Offloader._cancel_unneeded
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(queued); ++i) {
        const int64_t s = int_at(queued, i), e = int_at(ea, s);
        if (e >= 0 && !contains(rk, e) && truthy(PyList_GET_ITEM(pd, s)) && truthy(PyList_GET_ITEM(pf, s)) &&
            q.cancel(layer, s))
          q.drop(layer, e);
      }
      if (PyList_SetSlice(queued, 0, PyList_GET_SIZE(queued), nullptr) < 0) throw py::error_already_set();
    }
    py::list order, waiting;
    std::vector<std::pair<int64_t, int64_t>> later;
    int64_t hits = 0, late = 0, misses = 0, stall_ns = 0;
    for (Py_ssize_t k = 0; k < K; ++k) {
      const int64_t e = int_at(rk, k);
      int64_t s = int_at(so, e);
      if (s >= 0) {
        if (!truthy(PyList_GET_ITEM(pd, s))) {
          ++hits;
          order.append(py::make_tuple(e, s));
        } else {  // late: needed now, ahead of every queued prefetch (one on the link is left to land)
          ++late;
          const int64_t t = now_ns();
          if (q.cancel(layer, s)) load(layer, s, e);
          stall_ns += now_ns() - t;
          later.emplace_back(e, s);
        }
        continue;
      }
      ++misses;
      s = q.reserve(layer, e, -1, false, rk);  // pinned: this step's experts
      if (s < 0) {
        waiting.append(e);
        continue;
      }
      const int64_t t = now_ns();
      load(layer, s, e);
      stall_ns += now_ns() - t;
      later.emplace_back(e, s);
    }
    const Py_ssize_t n_ready = PyList_GET_SIZE(order.ptr());
    bool crossing = false;
    for (const auto& es : later) {
      order.append(py::make_tuple(es.first, es.second));
      crossing = crossing || truthy(PyList_GET_ITEM(pd, es.second));
    }
    py::object clocks = py::none(), named = py::none();
    if (layer + 1 < n_layers_ && predicts_[layer]) {  // Offloader._prediction_clocks, decode, the value rule
      const double now = now_ns() * 1e-9;
      // this layer's own loads cross the link while its hits compute: layer i+1 starts a layer less those
      // hits after they have landed, if that is later
      const double clock = crossing ? std::max(now, c.free_at(true) - (double)n_ready * expert_s_) : now;
      const double free = c.free_at(false);
      if (!(t_copy_ <= t_layer_ && free >= clock + t_layer_)) {
        py::object got = py::none();
        if (!planner.is_none()) {
          ValuePlanner& vp = planner.cast<ValuePlanner&>();
          TORCH_CHECK(vp.queues(), "DecodeStep: the planner does not queue its decisions");
          got = vp(x.cast<torch::Tensor>(), clock, free);
        }
        if (got.is_none()) clocks = py::make_tuple(clock, free);
        else named = py::reinterpret_borrow<py::tuple>(got)[0];
      }
    }
    if (PyList_GET_SIZE(waiting.ptr()) == 0) {  // every expert has its slot: their uses, as the loop would make them
      // (nothing between here and the computing touches this layer's policy: the caller only waits and computes)
      PyObject* policy = q.policy(layer);
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(order.ptr()); ++i) {
        PyObject* e = PyTuple_GET_ITEM(PyList_GET_ITEM(order.ptr(), i), 0);
        PyObject* r = PyObject_CallMethodOneArg(policy, hit_, e);
        if (r == nullptr) throw py::error_already_set();
        Py_DECREF(r);
      }
    }
    return py::make_tuple(order, waiting, hits, late, misses, stall_ns * 1e-9, clocks, named);
  }

 private:
  static bool truthy(PyObject* o) {
    int v = PyObject_IsTrue(o);
    if (v < 0) throw py::error_already_set();
    return v != 0;
  }
  static bool contains(PyObject* list, int64_t e) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i)
      if (int_at(list, i) == e) return true;
    return false;
  }
  void load(int64_t layer, int64_t s, int64_t e) {  // TransferEngine.demand: inline, or ahead of every prefetch
    if (inline_) q_->copy_now(layer, s, e);
    else q_->submit(layer, s, e, 0.0);
  }

  py::object queuer_obj_;  // keeps q_ alive
  Queuer* q_;
  bool inline_;
  double expert_s_, t_layer_, t_copy_;
  std::vector<bool> predicts_;
  int64_t n_layers_;
  PyObject* hit_;  // the policies' use method's name (interned, immortal for the process)
};
"""
