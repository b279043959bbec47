"""kn_utils: testing the knowledge-neuron thesis on Hugging Face language models.

    import kn_utils as ku
    lm = ku.load_model("default")
    ku.predict(lm, "The capital of France is")
"""
from .arch import Architecture, UnsupportedArchitecture, describe
from .hooks import (add_activation, enhance, hook_count, modify, record, scale_activation,
                    set_activation, suppress)
from .cache import cache_dir
from .models import LanguageModel, load_model
from .targets import prepare, subject_span
from .scoring import Score, predict, score_targets, target_log_probs, target_probability

from .attribution import (KNResult, attribution_maps, coarse_neurons, find_knowledge_neurons,
                          integrated_gradients, layer_distribution, r2_similarity)
from .editing.kn import KNEdit, intervention_summary, kn_edit, kn_erase, measure_intervention
from .editing.rome import (ROMEEdit, ROMEHyperParams, ROMEUpdate, apply_rome, layer_stats, rome_compute,
                           rome_edit)
from .evaluation import evaluate_edits, summarize_edits
from .data.pararel import Bag, causal_prompts, load_bags

from .tracing import (TraceResult, aggregate_traces, average_indirect_effect, average_indirect_effects,
                      causal_trace, causal_traces, filter_known, noise_level, restored_score)
from .data.counterfact import load_counterfact, load_known_facts

from .data.blimp import expand_templates, load_paradigm, minimal_pairs
from .blimp_tasks import blimp_accuracy, pair_scores as blimp_pair_scores

__version__ = "0.1.0"
