"""Python bindings for libbeit (BEiT vision transformers) over its C API, with ctypes.

The library is found via $BEIT_LIBRARY (a path to libbeit.so), else a libbeit.so next to this
package, else the system loader (LD_LIBRARY_PATH, ldconfig).
"""

from ._core import (
    ARCHITECTURES,
    Context,
    Dataset,
    DatasetInfo,
    DeviceInfo,
    Model,
    ModelInfo,
    OutputSizes,
    Sample,
    StepStats,
    Tokenizer,
    TokenizerInfo,
    Trainer,
    TrainerOptions,
    abi_version,
    device_info,
    library_path,
    version,
)
from ._errors import (
    BeitError,
    BufferSizeError,
    BusyError,
    ClosedError,
    ConfigError,
    FormatError,
    InternalError,
    InvalidArgumentError,
    IoError,
    NullPointerError,
    NumericalError,
    UnsupportedError,
)
from ._ffi import ABI_VERSION
from ._dvae import DvaeConfig, DvaeStepStats, DvaeTrainer, DvaeTrainOptions, DvaeTrainSummary, map_pixels

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "ARCHITECTURES",
    "BeitError",
    "BufferSizeError",
    "BusyError",
    "ClosedError",
    "ConfigError",
    "Context",
    "Dataset",
    "DatasetInfo",
    "DeviceInfo",
    "FormatError",
    "InternalError",
    "InvalidArgumentError",
    "IoError",
    "Model",
    "ModelInfo",
    "NullPointerError",
    "NumericalError",
    "OutputSizes",
    "Sample",
    "StepStats",
    "Tokenizer",
    "TokenizerInfo",
    "Trainer",
    "TrainerOptions",
    "UnsupportedError",
    "abi_version",
    "device_info",
    "library_path",
    "version",
    # tokenizer training (_dvae)
    "DvaeConfig",
    "DvaeStepStats",
    "DvaeTrainOptions",
    "DvaeTrainSummary",
    "DvaeTrainer",
    "map_pixels",
]
