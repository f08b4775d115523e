// The Python module apb_sparse._C: importing it loads the shared library, which registers the
// ops with the dispatcher.  It also exposes a few build facts and the kernel ISA switch.
#include <Python.h>

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

PyMethodDef methods[] = {
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
