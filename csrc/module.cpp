// The Python module apb_sparse._C: importing it loads the shared library, which registers the
// ops with the dispatcher.  It also exposes a few build facts and the kernel ISA switch.
#include <Python.h>

#include <cstring>

#include "cpu/row_spmm.h"

namespace {

PyObject* set_force_generic(PyObject*, PyObject* arg) {
  const int force = PyObject_IsTrue(arg);
  if (force < 0) return nullptr;
  return PyBool_FromLong(apb_sparse::kernel::set_force_generic(force != 0));
}

PyObject* has_avx2(PyObject*, PyObject*) { return PyBool_FromLong(apb_sparse::kernel::cpu_has_avx2_fma()); }

PyObject* set_row_tiles(PyObject*, PyObject* arg) {
  const int enable = PyObject_IsTrue(arg);
  if (enable < 0) return nullptr;
  return PyBool_FromLong(apb_sparse::kernel::set_row_tiles(enable != 0));
}

PyObject* set_channel_blocking(PyObject*, PyObject* arg) {
  const int enable = PyObject_IsTrue(arg);
  if (enable < 0) return nullptr;
  return PyBool_FromLong(apb_sparse::kernel::set_channel_blocking(enable != 0));
}

PyObject* set_lanes(PyObject*, PyObject* arg) {
  const int enable = PyObject_IsTrue(arg);
  if (enable < 0) return nullptr;
  return PyBool_FromLong(apb_sparse::kernel::set_lanes(enable != 0));
}

PyObject* set_shifted_layout(PyObject*, PyObject* arg) {
  const long mode = PyLong_AsLong(arg);
  if (mode == -1 && PyErr_Occurred()) return nullptr;
  if (mode < 0 || mode > 2) {
    PyErr_SetString(PyExc_ValueError, "mode must be 0 (off), 1 (auto) or 2 (always)");
    return nullptr;
  }
  return PyLong_FromLong(apb_sparse::kernel::set_shifted_layout(int(mode)));
}

PyObject* set_min_parallel_work(PyObject*, PyObject* arg) {
  const long long work = PyLong_AsLongLong(arg);
  if (work == -1 && PyErr_Occurred()) return nullptr;
  if (work < 0) {
    PyErr_SetString(PyExc_ValueError, "work must be >= 0");
    return nullptr;
  }
  return PyLong_FromLongLong(apb_sparse::kernel::set_min_parallel_work(work));
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(apb_sparse::kernel::isa_name(apb_sparse::kernel::active_isa()));
}

PyObject* supported_isas(PyObject*, PyObject*) {
  using namespace apb_sparse::kernel;
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

/// Caps the kernel ISA at the one named ("generic", "avx2", "avx512"); returns the previous cap's
/// name.  Naming an ISA this CPU lacks is a ValueError (a test forcing it would silently test
/// another path).
PyObject* set_max_isa(PyObject*, PyObject* arg) {
  using namespace apb_sparse::kernel;
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_SetString(PyExc_TypeError, "isa must be a str: 'generic', 'avx2' or 'avx512'");
    return nullptr;
  }
  int isa = -1;
  for (int i = kGeneric; i <= kAvx512; ++i)
    if (std::strcmp(name, isa_name(Isa(i))) == 0) isa = i;
  if (isa < 0) {
    PyErr_Format(PyExc_ValueError, "isa must be 'generic', 'avx2' or 'avx512', got '%s'", name);
    return nullptr;
  }
  if (isa > best_isa()) {
    PyErr_Format(PyExc_ValueError, "isa '%s' is not supported by this CPU (best: '%s')", name,
                 isa_name(best_isa()));
    return nullptr;
  }
  return PyUnicode_FromString(isa_name(set_max_isa(Isa(isa))));
}

PyMethodDef methods[] = {
    {"_set_channel_blocking", set_channel_blocking, METH_O,
     "Enable (True) or disable (False) input-channel (L1) blocking of forward convolutions; returns the previous "
     "setting."},
    {"_cpu_isa", cpu_isa, METH_NOARGS, "Name of the ISA the CPU kernel uses now ('generic', 'avx2', 'avx512')."},
    {"_supported_isas", supported_isas, METH_NOARGS, "ISAs of the CPU kernel this machine can run, lowest first."},
    {"_set_max_isa", set_max_isa, METH_O,
     "Cap the CPU kernel's ISA ('generic', 'avx2', 'avx512'); returns the previous cap. Tests force each path."},
    {"_set_min_parallel_work", set_min_parallel_work, METH_O,
     "Smallest work (multiply-adds + elements copied) of one CPU op call split across threads; returns the "
     "previous value."},
    {"_set_lanes", set_lanes, METH_O,
     "Enable (True) or disable (False) the images-in-lanes layout of forward convolutions on small maps; returns "
     "the previous setting."},
    {"_set_shifted_layout", set_shifted_layout, METH_O,
     "Mode of the kw-shifted (vector-aligned) input layout of unit-stride forward convolutions: 0 off, 1 auto "
     "(default), 2 wherever the geometry allows; returns the previous mode."},
    {"_set_row_tiles", set_row_tiles, METH_O,
     "Enable (True) or disable (False) the output-row tiles of forward convolutions; returns the previous setting."},
    {"_set_force_generic", set_force_generic, METH_O,
     "Force (True) or release (False) the portable CPU kernel; returns the previous setting."},
    {"_has_avx2", has_avx2, METH_NOARGS, "True if the AVX2+FMA CPU kernel is used on this machine."},
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
