"""hf-distrattn: DistrAttention and Tree Attention for Hugging Face Transformers.

``import hf_distrattn`` registers ``attn_implementation="distr"`` with Transformers.
"""

from .api import DEFAULT_CONFIG, distr_attention
from .calibrate import Calibration, calibrate
from .config import DistrConfig, parse_attn_spec
from .integration import configure, layer_configs, register

register()
from . import tree  # noqa: E402 - registers attn_implementation="tree"

__all__ = ["DEFAULT_CONFIG", "Calibration", "DistrConfig", "calibrate", "configure", "distr_attention",
           "layer_configs", "parse_attn_spec", "tree"]
__version__ = "0.1.0"
