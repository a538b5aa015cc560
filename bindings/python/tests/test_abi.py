"""The ctypes mirrors match the library: ABI version, every versioned struct's size."""

import ctypes

import beit
from beit import _core, _ffi


def test_abi_and_version():
    assert beit.abi_version() == beit.ABI_VERSION == 2
    assert beit.version().count(".") == 2


def test_struct_sizes_equal_the_library_defaults():
    for name, struct in _ffi.VERSIONED_STRUCTS.items():
        assert getattr(_core._lib, name)().struct_size == ctypes.sizeof(struct), name


def test_trainer_option_defaults_come_from_the_library():
    d = beit.TrainerOptions.defaults()
    assert d.learning_rate == 1.5e-3 and d.min_learning_rate == 1e-5
    assert (d.beta1, d.beta2, d.eps) == (0.9, 0.98, 1e-8)
    assert d.weight_decay_on == "beit" and d.drop_path_rate == -1.0
