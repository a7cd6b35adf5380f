"""T5 and LLaMA-like model families, logical-axis partitioning, t5x-style wrappers (see docs/models.md)."""

from genret_jax.models.llama import LlamaConfig, LlamaTransformer
from genret_jax.models.model_api import (BaseModel, DecoderOnlyModel, EncoderDecoderModel, get_model,
                                         model_for_config)
from genret_jax.models.partitioning import LOGICAL_AXIS_RULES, make_mesh
from genret_jax.models.t5 import T5Config, T5Transformer

__all__ = ["BaseModel", "DecoderOnlyModel", "EncoderDecoderModel", "LOGICAL_AXIS_RULES", "LlamaConfig",
           "LlamaTransformer", "T5Config", "T5Transformer", "get_model", "make_mesh", "model_for_config"]
