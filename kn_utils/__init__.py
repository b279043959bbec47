"""kn_utils: testing the knowledge-neuron thesis on Hugging Face language models.

    import kn_utils as ku
    lm = ku.load_model("default")
    ku.predict(lm, "The capital of France is")
"""
from .arch import Architecture, UnsupportedArchitecture, describe
from .hooks import (add_activation, enhance, hook_count, modify, record, scale_activation,
                    set_activation, suppress)
from .models import LanguageModel, cache_dir, load_model
from .targets import predict, prepare, target_log_probs, target_probability

__version__ = "0.1.0"
