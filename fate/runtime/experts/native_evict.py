"""The eviction policies of :mod:`.evict` in C++, compiled into the copier's extension (:mod:`.copier` builds
it; its ``eviction_policies()`` hands the module out, or None where it is not built).

``NativeLRUPolicy``, ``NativeLFUPolicy``, ``NativeLRFUPolicy`` and ``NativeARCPolicy`` make the same decisions as
the Python classes of :mod:`.evict` (which stay the reference, and serve where the extension is not built):
the same victims, the same ``resident()`` order, for ARC the same ``p`` and for LRFU the same scores to the
bit (doubles, the same formulas in the same order) and the same lists; the same errors with the same
messages.  A test drives the two side by side
on long random request sequences and compares them after every step.

Where the Python classes keep OrderedDicts, these keep intrusive doubly-linked lists over arrays indexed by
key: the keys are expert ids ``0 <= key < n_keys`` (the layer's number of experts, given at construction),
and every operation is O(1) but the scan for an evictable victim and the listings.  LFU keeps one list per use count
(buckets in increasing count, each least recent first), which is exactly the Python order (sorted by count,
ties by recency).

Where they differ from the reference (documented in :mod:`.evict` as well):

* a key outside ``0 <= key < n_keys`` is a ValueError in every method that takes one, a key that is not an
  integer a TypeError (the reference takes any hashable: a KeyError from ``hit``, 0 from ``count``...);
  ``key in policy`` is False for it, and for anything no integer equals;
* an ``evictable`` callable that changes the policy it is asked for (a hit, an admit, a discard...) gets a
  RuntimeError, where the reference's OrderedDict iteration raises one for LRU and ARC and the snapshots of
  LFU and LRFU do not;
* ``hit``, ``admit``, ``discard``, ``evict_where`` and ``resident`` take positional arguments only: they
  are plain CPython methods set on the pybind11 classes, as pybind11's dispatch (150-300 ns a call on the
  2-core VM) cost several times the policies' own work; they cost some 50 ns.

``evict_where(incoming, pinned, pending, slot_of)`` is the cache's own call (:meth:`.residency.ExpertCache.reserve`):
``evict(incoming, lambda k: k not in pinned and not pending[slot_of[k]])`` with ``pinned`` any container of
ints (a set, frozenset, list or tuple: read with PySet_Contains / PySequence_Contains), ``pending`` and
``slot_of`` the cache's lists of one layer, read in place (converting them would cost more than the policy).

The classes themselves (namespace ``fate_evict``) are plain C++ for other code in the same extension:
``hit``/``admit``/``discard``/``contains``/``size``, ``int64_t evict_if(incoming, ok)`` (``ok(key) -> bool``
in the policy's preference order; the victim, or -1 and no change), ``for_each_resident(f)`` in eviction
order; misuse throws ``std::invalid_argument`` (ValueError), a hit of a key that is not resident
``fate_evict::NotResident`` (KeyError at the binding).  From a Python policy object:
``pybind11::handle(obj).cast<fate_evict::ARC&>()`` (or ``LRU``, ``LFU``, ``LRFU``).
"""

SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace fate_evict {

// hit() of a key that is not resident (the bindings raise KeyError)
struct NotResident : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// Rings: n keys (nodes 0..n-1) and L lists, each a circular doubly-linked ring through its own sentinel
// node n + l; a key is on at most one list (on(k), -1 none).  Every operation is O(1).
class Rings {
 public:
  Rings(int32_t n, int32_t L) : n_(n), next_(n + L), prev_(n + L), on_(n, -1), size_(L, 0) {
    for (int32_t l = 0; l < L; ++l) next_[n + l] = prev_[n + l] = n + l;
  }
  int32_t on(int32_t k) const { return on_[k]; }
  int64_t size(int32_t l) const { return size_[l]; }
  int32_t sentinel(int32_t l) const { return n_ + l; }
  int32_t front(int32_t l) const { return key_or_end(next_[n_ + l]); }
  int32_t after(int32_t k) const { return key_or_end(next_[k]); }  // the next key of k's list, or -1
  int32_t next_node(int32_t node) const { return next_[node]; }
  bool is_key(int32_t node) const { return node < n_; }
  // k (on no list) into list l just before node `at` (a key of l or l's sentinel)
  void insert_before(int32_t at, int32_t k, int32_t l) {
    int32_t b = prev_[at];
    next_[b] = k;
    prev_[k] = b;
    next_[k] = at;
    prev_[at] = k;
    on_[k] = l;
    ++size_[l];
  }
  void push_back(int32_t l, int32_t k) { insert_before(n_ + l, k, l); }
  void remove(int32_t k) {
    int32_t l = on_[k];
    if (l < 0) return;
    next_[prev_[k]] = next_[k];
    prev_[next_[k]] = prev_[k];
    on_[k] = -1;
    --size_[l];
  }
  int32_t pop_front(int32_t l) {
    int32_t k = front(l);
    if (k >= 0) remove(k);
    return k;
  }
  template <class F> void for_each(int32_t l, F&& f) const {
    for (int32_t k = front(l); k >= 0; k = after(k)) f(k);
  }

 private:
  int32_t key_or_end(int32_t node) const { return node < n_ ? node : -1; }
  int32_t n_;
  std::vector<int32_t> next_, prev_, on_;
  std::vector<int64_t> size_;
};

// What the three policies share: the capacity, the key range, the errors (the messages of the Python
// reference), and a version that every change bumps, so that a scan calling back into Python notices a
// callback that changed the policy under it.
class Base {
 public:
  Base(const char* name, int64_t capacity, int64_t n_keys) : name_(name), capacity_(capacity), n_keys_(n_keys) {
    if (capacity < 0)
      throw std::invalid_argument("cache capacity must be a non-negative integer, got " + std::to_string(capacity));
    if (n_keys < 0 || n_keys > (int64_t)(INT32_MAX / 4))
      throw std::invalid_argument(std::string(name) + ": n_keys must be in 0..2**29, got " + std::to_string(n_keys));
  }
  const char* name() const { return name_; }
  int64_t capacity() const { return capacity_; }
  int64_t n_keys() const { return n_keys_; }
  bool in_range(int64_t k) const { return k >= 0 && k < n_keys_; }
  void check_key(int64_t k) const {
    if (!in_range(k)) out_of_range(std::to_string(k));
  }
  [[noreturn]] void out_of_range(const std::string& key) const {
    throw std::invalid_argument(std::string(name_) + ": expert " + key +
                                " is out of range for this native policy (0 <= key < " + std::to_string(n_keys_) + ")");
  }

 protected:
  void check_admit(int64_t k, bool resident, int64_t size) const {
    check_key(k);
    if (resident)
      throw std::invalid_argument(std::string(name_) + ": expert " + std::to_string(k) +
                                  " is already resident; call hit() for a use");
    if (size >= capacity_)
      throw std::invalid_argument(std::string(name_) + ": admit(" + std::to_string(k) + ") into a full cache of " +
                                  std::to_string(capacity_) +
                                  " slots; call evict() first and admit only if it returned a victim");
  }
  void check_incoming(int64_t k, bool resident) const {
    check_key(k);
    if (resident)
      throw std::invalid_argument(std::string(name_) + ": evict() for expert " + std::to_string(k) +
                                  ", which is resident; call hit()");
  }
  NotResident missing(int64_t k) const {
    return NotResident(std::string(name_) + ": expert " + std::to_string(k) + " is not resident");
  }
  void check_unchanged(uint64_t version) const {
    if (version != version_)
      throw std::runtime_error(std::string(name_) +
                               ": the policy changed during evict() (evictable must not change it)");
  }
  // the first key of list l (least recent first) that ok() accepts, or -1
  template <class Pred> int32_t first_ok(const Rings& r, int32_t l, Pred& ok) const {
    const uint64_t v = version_;
    for (int32_t k = r.front(l); k >= 0; k = r.after(k)) {
      bool yes = ok((int64_t)k);
      check_unchanged(v);
      if (yes) return k;
    }
    return -1;
  }
  const char* name_;
  int64_t capacity_, n_keys_;
  uint64_t version_ = 0;
};

// Least recently used: one list, least recent first.
class LRU : public Base {
 public:
  static constexpr const char* NAME = "lru";
  LRU(int64_t capacity, int64_t n_keys) : Base(NAME, capacity, n_keys), r_((int32_t)n_keys, 1) {}
  int64_t size() const { return r_.size(0); }
  bool contains(int64_t k) const { return in_range(k) && r_.on((int32_t)k) == 0; }
  void hit(int64_t k) {
    check_key(k);
    if (r_.on((int32_t)k) != 0) throw missing(k);
    ++version_;
    r_.remove((int32_t)k);
    r_.push_back(0, (int32_t)k);
  }
  void admit(int64_t k) {
    check_admit(k, contains(k), size());
    ++version_;
    r_.push_back(0, (int32_t)k);
  }
  template <class Pred> int64_t evict_if(int64_t incoming, Pred&& ok) {
    check_incoming(incoming, contains(incoming));
    int32_t v = first_ok(r_, 0, ok);
    if (v >= 0) {
      ++version_;
      r_.remove(v);
    }
    return v;
  }
  int64_t evict(int64_t incoming) { return evict_if(incoming, [](int64_t) { return true; }); }
  void discard(int64_t k) {
    check_key(k);
    ++version_;
    r_.remove((int32_t)k);
  }
  template <class F> void for_each_resident(F&& f) const { r_.for_each(0, f); }

 private:
  Rings r_;
};

// Least frequently used, ties by least recent use, counts for resident keys only.  The keys sit in
// buckets of equal count, the buckets in increasing count and each least recent first: a key joins a
// bucket at its last use (admission or hit), so a bucket's order is its keys' recency order.  Buckets are
// ids 0..n_keys (a bucket holds at least one key, so no more than n_keys are ever in use), themselves on
// one ring (buckets_, list 0) in increasing count; key list l (keys_) is bucket l's keys.
class LFU : public Base {
 public:
  static constexpr const char* NAME = "lfu";
  LFU(int64_t capacity, int64_t n_keys)
      : Base(NAME, capacity, n_keys), keys_((int32_t)n_keys, (int32_t)n_keys + 1),
        buckets_((int32_t)n_keys + 1, 1), count_(n_keys + 1, 0) {
    for (int32_t b = (int32_t)n_keys; b >= 0; --b) free_.push_back(b);
  }
  int64_t size() const { return size_; }
  bool contains(int64_t k) const { return in_range(k) && keys_.on((int32_t)k) >= 0; }
  // uses of a resident key since its admission (which counts as one); 0 if not resident
  int64_t count(int64_t k) const {
    check_key(k);
    int32_t b = keys_.on((int32_t)k);
    return b < 0 ? 0 : count_[b];
  }
  void hit(int64_t k) {
    check_key(k);
    int32_t b = keys_.on((int32_t)k);
    if (b < 0) throw missing(k);
    ++version_;
    const int64_t c = count_[b] + 1;
    int32_t nb = buckets_.next_node(b);
    bool next_has_c = buckets_.is_key(nb) && count_[nb] == c;
    if (!next_has_c && keys_.size(b) == 1) {  // alone in its bucket: the bucket's count moves with it
      count_[b] = c;
      return;
    }
    if (!next_has_c) nb = new_bucket(c, nb);
    keys_.remove((int32_t)k);
    keys_.push_back(nb, (int32_t)k);
    if (keys_.size(b) == 0) free_bucket(b);
  }
  void admit(int64_t k) {
    check_admit(k, contains(k), size());
    ++version_;
    int32_t first = buckets_.next_node(buckets_.sentinel(0));
    int32_t b = buckets_.is_key(first) && count_[first] == 1 ? first : new_bucket(1, first);
    keys_.push_back(b, (int32_t)k);
    ++size_;
  }
  template <class Pred> int64_t evict_if(int64_t incoming, Pred&& ok) {
    check_incoming(incoming, contains(incoming));
    for (int32_t b = buckets_.front(0); b >= 0; b = buckets_.after(b)) {
      int32_t v = first_ok(keys_, b, ok);
      if (v >= 0) {
        remove(v);
        return v;
      }
    }
    return -1;
  }
  int64_t evict(int64_t incoming) { return evict_if(incoming, [](int64_t) { return true; }); }
  void discard(int64_t k) {
    check_key(k);
    if (keys_.on((int32_t)k) >= 0) remove((int32_t)k);
  }
  template <class F> void for_each_resident(F&& f) const {
    for (int32_t b = buckets_.front(0); b >= 0; b = buckets_.after(b)) keys_.for_each(b, f);
  }

 private:
  int32_t new_bucket(int64_t c, int32_t before) {  // an empty bucket of count c, just before node `before`
    int32_t b = free_.back();
    free_.pop_back();
    count_[b] = c;
    buckets_.insert_before(before, b, 0);
    return b;
  }
  void free_bucket(int32_t b) {
    buckets_.remove(b);
    free_.push_back(b);
  }
  void remove(int32_t k) {
    ++version_;
    int32_t b = keys_.on(k);
    keys_.remove(k);
    --size_;
    if (keys_.size(b) == 0) free_bucket(b);
  }
  Rings keys_, buckets_;
  std::vector<int64_t> count_;  // by bucket
  std::vector<int32_t> free_;   // unused bucket ids
  int64_t size_ = 0;
};

// LRFU: each resident key's score as of its last use (s_) and the request clock then (last_); its score now
// is s_ * pow(decay, clock - last), the reference's operations in its order, so the same bits (built with
// -std=c++20, where GCC fuses no multiply-add: each operation rounds as Python's does).  Every score decays
// by the same factor per request, so two keys change order only at their own uses: the eviction order is
// that of log(s_) - last * log(decay), then last use (unique: every hit and admission ticks the clock) —
// the reference's sort key, the same bits — kept in a sorted set (order_) as keys are used.  O(log n) a
// request and an eviction, O(n) a listing.
class LRFU : public Base {
 public:
  static constexpr const char* NAME = "lrfu";
  static constexpr int64_t HALF_LIFE_PER_SLOT = 4;  // the reference's LRFU_HALF_LIFE_PER_SLOT
  LRFU(int64_t capacity, int64_t n_keys)
      : Base(NAME, capacity, n_keys), half_life_((double)std::max<int64_t>(1, HALF_LIFE_PER_SLOT * capacity)),
        decay_(std::pow(0.5, 1.0 / half_life_)), ln_decay_(std::log(decay_)), s_(n_keys, 0.0), v_(n_keys, 0.0),
        last_(n_keys, 0), in_(n_keys, 0) {}
  double half_life() const { return half_life_; }
  int64_t size() const { return (int64_t)order_.size(); }
  bool contains(int64_t k) const { return in_range(k) && in_[k]; }
  // a resident key's score now; 0.0 if it is not resident
  double score(int64_t k) const {
    check_key(k);
    return in_[k] ? now(k) : 0.0;
  }
  void hit(int64_t k) {
    check_key(k);
    if (!in_[k]) throw missing(k);
    ++version_;
    ++clock_;
    order_.erase(entry(k));
    use(k, now(k) + 1.0);
  }
  void admit(int64_t k) {
    check_admit(k, contains(k), size());
    ++version_;
    ++clock_;
    in_[k] = 1;
    use(k, 1.0);
  }
  template <class Pred> int64_t evict_if(int64_t incoming, Pred&& ok) {
    check_incoming(incoming, contains(incoming));
    const uint64_t v = version_;
    for (const Entry& e : order_) {
      const int32_t k = std::get<2>(e);
      bool yes = ok((int64_t)k);
      check_unchanged(v);
      if (yes) {
        remove(k);
        return k;
      }
    }
    return -1;
  }
  int64_t evict(int64_t incoming) { return evict_if(incoming, [](int64_t) { return true; }); }
  void discard(int64_t k) {
    check_key(k);
    if (in_[k]) remove((int32_t)k);
  }
  template <class F> void for_each_resident(F&& f) const {
    for (const Entry& e : order_) f(std::get<2>(e));
  }

 private:
  using Entry = std::tuple<double, int64_t, int32_t>;  // (log-domain score, last use, key)
  double now(int64_t k) const { return s_[k] * std::pow(decay_, (double)(clock_ - last_[k])); }
  Entry entry(int64_t k) const { return Entry(v_[k], last_[k], (int32_t)k); }
  void use(int64_t k, double s) {  // k's score is s as of now: its place in the order moves
    s_[k] = s;
    last_[k] = clock_;
    v_[k] = std::log(s) - (double)clock_ * ln_decay_;
    order_.insert(entry(k));
  }
  void remove(int32_t k) {
    ++version_;
    order_.erase(entry(k));
    in_[k] = 0;
  }
  double half_life_, decay_, ln_decay_;
  std::vector<double> s_, v_;
  std::vector<int64_t> last_;
  std::vector<uint8_t> in_;
  std::set<Entry> order_;
  int64_t clock_ = 0;
};

// Adaptive Replacement Cache: the lists T1, T2, B1, B2 (least recent first), the target size p of T1 and
// the ghost key whose adaptation evict() already applied.  Exactly the Python reference (its docstring maps
// the paper's "request x" onto hit/evict/admit/discard); p is a double with the same formulas, in the
// same order, so it stays bit-identical.
class ARC : public Base {
 public:
  static constexpr const char* NAME = "arc";
  static constexpr int32_t T1 = 0, T2 = 1, B1 = 2, B2 = 3;  // the lists
  ARC(int64_t capacity, int64_t n_keys) : Base(NAME, capacity, n_keys), r_((int32_t)n_keys, 4) {}
  double p() const { return p_; }
  const Rings& lists() const { return r_; }
  int64_t size() const { return r_.size(T1) + r_.size(T2); }
  bool contains(int64_t k) const {
    if (!in_range(k)) return false;
    int32_t l = r_.on((int32_t)k);
    return l == T1 || l == T2;
  }
  void hit(int64_t k) {
    check_key(k);
    if (!contains(k)) throw missing(k);
    ++version_;
    r_.remove((int32_t)k);
    r_.push_back(T2, (int32_t)k);
  }
  template <class Pred> int64_t evict_if(int64_t incoming, Pred&& ok) {
    check_incoming(incoming, contains(incoming));
    const double p_before = p_;
    const int32_t w = r_.on((int32_t)incoming);
    const bool ghost = w == B1 || w == B2;
    if (ghost && adapted_ != incoming) adapt(w);
    const bool from_t1 = replace_from_t1(w == B2);
    const int32_t order[2] = {from_t1 ? T1 : T2, from_t1 ? T2 : T1};
    for (int32_t live : order) {
      int32_t v = first_ok(r_, live, ok);
      if (v >= 0) {
        ++version_;
        r_.remove(v);
        r_.push_back(live == T1 ? B1 : B2, v);
        adapted_ = ghost ? incoming : -1;
        return v;
      }
    }
    p_ = p_before;  // nothing could go: leave no trace of this request
    return -1;
  }
  int64_t evict(int64_t incoming) { return evict_if(incoming, [](int64_t) { return true; }); }
  void admit(int64_t k) {
    check_admit(k, contains(k), size());
    ++version_;
    const bool adapted = adapted_ == k;
    adapted_ = -1;
    const int32_t w = r_.on((int32_t)k);
    if (w == B1 || w == B2) {
      if (!adapted) adapt(w);
      r_.remove((int32_t)k);
      r_.push_back(T2, (int32_t)k);
      return;
    }
    const int64_t c = capacity_;
    if (r_.size(T1) + r_.size(B1) >= c)
      r_.pop_front(B1);  // IV.A: |T1| < c (the cache is not full), so B1 is not empty
    else if (r_.size(T1) + r_.size(T2) + r_.size(B1) + r_.size(B2) >= 2 * c)
      r_.pop_front(B2);  // IV.B: B2 is not empty
    r_.push_back(T1, (int32_t)k);
  }
  void discard(int64_t k) {
    check_key(k);
    ++version_;
    r_.remove((int32_t)k);
    if (adapted_ == k) adapted_ = -1;
  }
  // T1 then T2 when REPLACE would take from T1 for a new key, else T2 then T1
  template <class F> void for_each_resident(F&& f) const {
    if (replace_from_t1(false) || r_.size(T2) == 0) {
      r_.for_each(T1, f);
      r_.for_each(T2, f);
    } else {
      r_.for_each(T2, f);
      r_.for_each(T1, f);
    }
  }

 private:
  void adapt(int32_t w) {  // w: the list (B1 or B2) of the requested ghost
    const double nb1 = (double)r_.size(B1), nb2 = (double)r_.size(B2);
    if (w == B1)
      p_ = std::min((double)capacity_, p_ + std::max(nb2 / nb1, 1.0));
    else if (w == B2)
      p_ = std::max(0.0, p_ - std::max(nb1 / nb2, 1.0));
  }
  bool replace_from_t1(bool incoming_in_b2) const {
    const int64_t n1 = r_.size(T1);
    return n1 >= 1 && ((double)n1 > p_ || (incoming_in_b2 && (double)n1 == p_));
  }
  Rings r_;
  double p_ = 0.0;
  int64_t adapted_ = -1;  // -1: none
};

// -- Python bindings ------------------------------------------------------------------------------------
//
// pybind11 classes, but the cache's hot calls (hit, admit, discard, evict_where, resident) are plain CPython
// methods (METH_O / METH_FASTCALL / METH_NOARGS, positional arguments only) set on the pybind11 type:
// pybind11's dispatch costs 150-300 ns a call on the 2-core VM, several times the policies' own work,
// where these cost some 50 ns.

namespace py = pybind11;

static inline PyObject* new_int(int64_t k) {
  PyObject* o = PyLong_FromLongLong(k);
  if (o == nullptr) throw py::error_already_set();
  return o;
}

static inline bool truthy(PyObject* o) {
  if (o == Py_True) return true;
  if (o == Py_False) return false;
  int t = PyObject_IsTrue(o);
  if (t < 0) throw py::error_already_set();
  return t != 0;
}

// the key of `key in policy`: Python finds an int key by any equal number (an int, a bool, an integral
// float, an __index__ object); false: nothing can equal a key
static bool key_of(PyObject* o, int64_t& k) {
  if (PyFloat_Check(o)) {
    double d = PyFloat_AS_DOUBLE(o);
    if (!(d >= -9.2e18 && d <= 9.2e18) || std::floor(d) != d) return false;
    k = (int64_t)d;
    return true;
  }
  if (!PyLong_Check(o) && !PyIndex_Check(o)) return false;
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow) return false;
  k = v;
  return true;
}

// a key argument: an int (or __index__ object; TypeError otherwise), ValueError beyond int64
template <class P> static int64_t key_arg(const P& p, PyObject* o) {
  int overflow = 0;
  long long k = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (k == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow) p.out_of_range(py::repr(o).cast<std::string>());
  return k;
}

// the C++ policy of a Python one; the method descriptor already checked self's type
template <class P> static P& self_of(PyObject* self) {
  void* v = reinterpret_cast<py::detail::instance*>(self)->get_value_and_holder().value_ptr();
  if (v == nullptr) throw py::type_error("the native policy was not initialised (__init__ not called)");
  return *static_cast<P*>(v);
}

// runs f, returns its result, or sets the Python error of what it threw and returns nullptr
template <class F> static PyObject* guarded(F&& f) noexcept {
  try {
    return f();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const NotResident& e) {
    PyErr_SetString(PyExc_KeyError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

template <class P> static py::list resident_list(const P& p) {
  PyObject* out = PyList_New(p.size());
  if (out == nullptr) throw py::error_already_set();
  py::list l = py::reinterpret_steal<py::list>(out);
  Py_ssize_t i = 0;
  p.for_each_resident([&](int32_t k) { PyList_SET_ITEM(out, i++, new_int(k)); });
  return l;
}

static py::tuple arc_list(const ARC& a, int32_t which) {
  const Rings& r = a.lists();
  PyObject* out = PyTuple_New(r.size(which));
  if (out == nullptr) throw py::error_already_set();
  py::tuple t = py::reinterpret_steal<py::tuple>(out);
  Py_ssize_t i = 0;
  r.for_each(which, [&](int32_t k) { PyTuple_SET_ITEM(out, i++, new_int(k)); });
  return t;
}

static inline PyObject* victim_or_none(int64_t v) {
  if (v < 0) Py_RETURN_NONE;
  return new_int(v);
}

// evict(incoming, evictable=None): evictable(key) -> truthy, called in the policy's preference order
template <class P> static py::object evict_py(P& p, int64_t incoming, py::object evictable) {
  PyObject* f = evictable.ptr();
  if (evictable.is_none() || !truthy(f))  // `evictable or _always`
    return py::reinterpret_steal<py::object>(victim_or_none(p.evict(incoming)));
  return py::reinterpret_steal<py::object>(victim_or_none(p.evict_if(incoming, [f](int64_t k) {
    PyObject* key = new_int(k);
    PyObject* r = PyObject_CallOneArg(f, key);
    Py_DECREF(key);
    if (r == nullptr) throw py::error_already_set();
    py::object keep = py::reinterpret_steal<py::object>(r);
    return truthy(r);
  })));
}

// evict_where(incoming, pinned, pending, slot_of): evict(incoming, lambda k: k not in pinned and not
// pending[slot_of[k]]), the containers read in place (pinned: any container; pending, slot_of: lists)
template <class P> static PyObject* evict_where_raw(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    P& p = self_of<P>(self);
    if (nargs != 4)
      throw py::type_error("evict_where(incoming, pinned, pending, slot_of) takes 4 positional arguments, got " +
                           std::to_string(nargs));
    PyObject *pin = args[1], *pd = args[2], *so = args[3];
    if (!PyList_Check(pd) || !PyList_Check(so)) throw py::type_error("evict_where: pending and slot_of are lists");
    const int64_t incoming = key_arg(p, args[0]);
    const bool is_set = PyAnySet_Check(pin);
    bool none_pinned = false;
    if (is_set) none_pinned = PySet_GET_SIZE(pin) == 0;
    else if (PyTuple_Check(pin)) none_pinned = PyTuple_GET_SIZE(pin) == 0;
    else if (PyList_Check(pin)) none_pinned = PyList_GET_SIZE(pin) == 0;
    return victim_or_none(p.evict_if(incoming, [=](int64_t k) {
      if (!none_pinned) {
        PyObject* key = new_int(k);
        int c = is_set ? PySet_Contains(pin, key) : PySequence_Contains(pin, key);
        Py_DECREF(key);
        if (c < 0) throw py::error_already_set();
        if (c) return false;
      }
      if (k >= PyList_GET_SIZE(so)) throw py::index_error("list index out of range");
      Py_ssize_t s = PyNumber_AsSsize_t(PyList_GET_ITEM(so, k), PyExc_IndexError);
      if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
      const Py_ssize_t m = PyList_GET_SIZE(pd);
      if (s < 0) s += m;  // as Python's pending[slot_of[k]]
      if (s < 0 || s >= m) throw py::index_error("list index out of range");
      return !truthy(PyList_GET_ITEM(pd, s));
    }));
  });
}

template <class P, void (P::*M)(int64_t)> static PyObject* key_method(PyObject* self, PyObject* arg) {
  return guarded([&]() -> PyObject* {
    P& p = self_of<P>(self);
    (p.*M)(key_arg(p, arg));
    Py_RETURN_NONE;
  });
}

template <class P> static PyObject* resident_raw(PyObject* self, PyObject*) {
  return guarded([&]() -> PyObject* { return resident_list(self_of<P>(self)).release().ptr(); });
}

template <class P> static py::class_<P> bind_policy(py::module& m, const char* cls) {
  py::class_<P> c(m, cls);
  c.def(py::init<int64_t, int64_t>(), py::arg("capacity"), py::arg("n_keys"))
      .def_property_readonly("name", [](const P&) { return P::NAME; })
      .def_property_readonly("capacity", &P::capacity)
      .def_property_readonly("n_keys", &P::n_keys)
      .def("evict", &evict_py<P>, py::arg("incoming"), py::arg("evictable") = py::none())
      .def("__contains__", [](const P& p, py::handle o) {
        int64_t k;
        return key_of(o.ptr(), k) && p.contains(k);
      })
      .def("__len__", &P::size)
      .def("__repr__", [cls](const P& p) {
        return std::string(cls) + "(capacity=" + std::to_string(p.capacity()) + ", n_keys=" +
               std::to_string(p.n_keys()) + ", resident=" + std::string(py::repr(resident_list(p))) + ")";
      });
  static PyMethodDef raw[] = {
      {"hit", (PyCFunction)(void (*)(void))&key_method<P, &P::hit>, METH_O,
       "hit(key): a use of a resident key (KeyError if it is not resident)"},
      {"admit", (PyCFunction)(void (*)(void))&key_method<P, &P::admit>, METH_O,
       "admit(key): a key that is not resident into a free slot"},
      {"discard", (PyCFunction)(void (*)(void))&key_method<P, &P::discard>, METH_O,
       "discard(key): forget a key (no-op if it is unknown)"},
      {"evict_where", (PyCFunction)(void (*)(void))&evict_where_raw<P>, METH_FASTCALL,
       "evict_where(incoming, pinned, pending, slot_of): evict(incoming, lambda k: k not in pinned and not "
       "pending[slot_of[k]]), the containers read in place; the victim or None"},
      {"resident", (PyCFunction)(void (*)(void))&resident_raw<P>, METH_NOARGS,
       "resident(): the resident keys in eviction order"},
  };
  for (PyMethodDef& d : raw) {
    PyObject* descr = PyDescr_NewMethod((PyTypeObject*)c.ptr(), &d);
    if (descr == nullptr) throw py::error_already_set();
    int rc = PyObject_SetAttrString(c.ptr(), d.ml_name, descr);
    Py_DECREF(descr);
    if (rc < 0) throw py::error_already_set();
  }
  return c;
}

}  // namespace fate_evict

static void bind_evict(pybind11::module& m) {
  using namespace fate_evict;
  bind_policy<LRU>(m, "NativeLRUPolicy");
  bind_policy<LFU>(m, "NativeLFUPolicy").def("count", &LFU::count, py::arg("key"));
  bind_policy<LRFU>(m, "NativeLRFUPolicy")
      .def("score", &LRFU::score, py::arg("key"))
      .def_property_readonly("half_life", &LRFU::half_life);
  bind_policy<ARC>(m, "NativeARCPolicy")
      .def_property_readonly("p", &ARC::p)
      .def_property_readonly("t1", [](const ARC& a) { return arc_list(a, ARC::T1); })
      .def_property_readonly("t2", [](const ARC& a) { return arc_list(a, ARC::T2); })
      .def_property_readonly("b1", [](const ARC& a) { return arc_list(a, ARC::B1); })
      .def_property_readonly("b2", [](const ARC& a) { return arc_list(a, ARC::B2); });
}
"""
