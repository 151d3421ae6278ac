"""d2m_ref: a NumPy reference implementation and test oracle for Dense2MoE language models.

The normative description is spec/architecture.md; this package mirrors it function by function.
"""

from .config import LayerSpec, ModelConfig, MoESpec, RopeSpec, load_config, parse_config
from .errors import ConfigError, D2MError, InputError, WeightsError
from .model import KVCache, forward
from .weights import Model, Param, expected_tensors, load_model

__all__ = ["ConfigError", "D2MError", "InputError", "KVCache", "LayerSpec", "Model", "ModelConfig", "MoESpec",
           "Param", "RopeSpec", "WeightsError", "expected_tensors", "forward", "load_config", "load_model",
           "parse_config"]

__version__ = "0.1.0"
SPEC_VERSION = "1"
