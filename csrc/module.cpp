// The Python module apb_sparse._C: importing it loads the shared library, which registers the
// ops with the dispatcher.  It also exposes the build facts and the kernel's run-time options (one entry point).
#include <Python.h>

#include <cstring>

#include "cpu/row_spmm.h"

namespace {

using namespace apb_sparse::kernel;

/// Names of the kernel's run-time options, in the order `_kernel_option()` lists them.
const char* const kOptions[] = {"isa", "row_tiles", "channel_blocking", "lanes", "lanes_tiles",
                                "lanes_blocks_inner", "shifted_layout", "min_parallel_work", "output_cache_bytes"};

PyObject* option_value(const char* name) {
  if (std::strcmp(name, "isa") == 0) return PyUnicode_FromString(isa_name(active_isa()));
  if (std::strcmp(name, "row_tiles") == 0) return PyBool_FromLong(row_tiles_enabled());
  if (std::strcmp(name, "channel_blocking") == 0) return PyBool_FromLong(channel_blocking_enabled());
  if (std::strcmp(name, "lanes") == 0) return PyBool_FromLong(lanes_enabled());
  if (std::strcmp(name, "lanes_tiles") == 0) return PyBool_FromLong(lanes_tiles_enabled());
  if (std::strcmp(name, "lanes_blocks_inner") == 0) return PyBool_FromLong(lanes_blocks_inner());
  if (std::strcmp(name, "shifted_layout") == 0) return PyLong_FromLong(shifted_layout());
  if (std::strcmp(name, "output_cache_bytes") == 0) return PyLong_FromLongLong(output_cache_bytes());
  return PyLong_FromLongLong(min_parallel_work());
}

/// Parses a bool option value: True / False only (an int 0/1 would hide a mistyped call).
int parse_bool(const char* name, PyObject* value) {
  if (!PyBool_Check(value)) {
    PyErr_Format(PyExc_TypeError, "kernel option '%s' takes True or False", name);
    return -1;
  }
  return value == Py_True;
}

/// Sets option `name`; returns its previous value (new reference) or nullptr with an error set.
PyObject* set_option(const char* name, PyObject* value) {
  if (std::strcmp(name, "isa") == 0) {
    const char* isa_str = PyUnicode_Check(value) ? PyUnicode_AsUTF8(value) : nullptr;
    if (isa_str == nullptr) {
      PyErr_SetString(PyExc_TypeError, "kernel option 'isa' must be a str: 'generic', 'avx2' or 'avx512'");
      return nullptr;
    }
    int isa = -1;
    for (int i = kGeneric; i <= kAvx512; ++i)
      if (std::strcmp(isa_str, isa_name(Isa(i))) == 0) isa = i;
    if (isa < 0) {
      PyErr_Format(PyExc_ValueError, "kernel option 'isa' must be 'generic', 'avx2' or 'avx512', got '%s'", isa_str);
      return nullptr;
    }
    if (isa > best_isa()) {
      // Forcing an ISA the CPU lacks would silently test another path.
      PyErr_Format(PyExc_ValueError, "kernel option 'isa': '%s' is not supported by this CPU (best: '%s')", isa_str,
                   isa_name(best_isa()));
      return nullptr;
    }
    return PyUnicode_FromString(isa_name(set_max_isa(Isa(isa))));
  }
  if (std::strcmp(name, "shifted_layout") == 0 || std::strcmp(name, "min_parallel_work") == 0 ||
      std::strcmp(name, "output_cache_bytes") == 0) {
    if (PyBool_Check(value) || !PyLong_Check(value)) {
      PyErr_Format(PyExc_TypeError, "kernel option '%s' takes an int", name);
      return nullptr;
    }
    const long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) return nullptr;
    if (name[0] == 's') {
      if (v < 0 || v > 2) {
        PyErr_SetString(PyExc_ValueError, "kernel option 'shifted_layout' must be 0 (off), 1 (auto) or 2 (always)");
        return nullptr;
      }
      return PyLong_FromLong(set_shifted_layout(int(v)));
    }
    if (v < 0) {
      PyErr_Format(PyExc_ValueError, "kernel option '%s' must be >= 0", name);
      return nullptr;
    }
    if (name[0] == 'o') return PyLong_FromLongLong(set_output_cache_bytes(v));
    return PyLong_FromLongLong(set_min_parallel_work(v));
  }
  const int on = parse_bool(name, value);
  if (on < 0) return nullptr;
  if (std::strcmp(name, "row_tiles") == 0) return PyBool_FromLong(set_row_tiles(on));
  if (std::strcmp(name, "channel_blocking") == 0) return PyBool_FromLong(set_channel_blocking(on));
  if (std::strcmp(name, "lanes_tiles") == 0) return PyBool_FromLong(set_lanes_tiles(on));
  if (std::strcmp(name, "lanes_blocks_inner") == 0) return PyBool_FromLong(set_lanes_blocks_inner(on));
  return PyBool_FromLong(set_lanes(on));
}

/// _kernel_option(name[, value]): the option's current value; with a value, sets it and returns the
/// previous one.  _kernel_option() lists the option names.
PyObject* kernel_option(PyObject*, PyObject* args) {
  const char* name = nullptr;
  PyObject* value = nullptr;
  if (!PyArg_ParseTuple(args, "|sO:_kernel_option", &name, &value)) return nullptr;
  if (name == nullptr) {
    const Py_ssize_t n = sizeof(kOptions) / sizeof(kOptions[0]);
    PyObject* names = PyTuple_New(n);
    if (names == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* s = PyUnicode_FromString(kOptions[i]);
      if (s == nullptr) {
        Py_DECREF(names);
        return nullptr;
      }
      PyTuple_SET_ITEM(names, i, s);
    }
    return names;
  }
  bool known = false;
  for (const char* o : kOptions) known = known || std::strcmp(name, o) == 0;
  if (!known) {
    PyErr_Format(PyExc_ValueError,
                 "unknown kernel option '%s' (options: isa, row_tiles, channel_blocking, lanes, lanes_tiles, "
                 "lanes_blocks_inner, shifted_layout, min_parallel_work, output_cache_bytes)",
                 name);
    return nullptr;
  }
  return value == nullptr ? option_value(name) : set_option(name, value);
}

PyObject* supported_isas(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (int i = kGeneric; i <= best_isa(); ++i) {
    PyObject* name = PyUnicode_FromString(isa_name(Isa(i)));
    if (name == nullptr || PyList_Append(list, name) < 0) {
      Py_XDECREF(name);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return list;
}

PyMethodDef methods[] = {
    {"_kernel_option", kernel_option, METH_VARARGS,
     "_kernel_option(name[, value]): read a run-time option of the CPU kernel, or set it and get the previous "
     "value; without arguments, the option names. Use apb_sparse.ops.kernel_options() instead."},
    {"_supported_isas", supported_isas, METH_NOARGS, "ISAs of the CPU kernel this machine can run, lowest first."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "apb_sparse compiled ops", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef APB_WITH_CUDA
  PyModule_AddIntConstant(mod, "cuda_built", 1);
#else
  PyModule_AddIntConstant(mod, "cuda_built", 0);
#endif
  return mod;
}
