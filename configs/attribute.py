"""Default experiment of scripts/attribute.py: the tiny synthetic Qwen3-MoE (written to GGUF and loaded
back), ggml-cpu against f32, four prompts of random token ids. Override with --config.<field>=value."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ""              # path of a GGUF file; empty: the synthetic model of `size`
    c.size = "tiny"           # synthetic model size (numlab.models.config.CONFIGS)
    c.seed = 0                # synthetic weights seed
    c.low = "ggml-cpu"        # policy under test (preset name or rules)
    c.ref = "f32"             # reference policy
    c.compare = ""            # further policies for the cosine plot, comma-separated
    c.groups = "kind"         # kind | layer | site
    c.ig_points = 8           # quadrature nodes of the integrated gradients
    c.rule = "gauss"          # gauss | midpoint
    c.n_prompts = 4
    c.n_tokens = 16
    c.prompt_seed = 0         # prompts are random token ids from numpy's default_rng(prompt_seed)
    c.batch_size = 0          # mix rows per compiled sweep call; 0: all in one
    c.out = ""                # run folder; empty: results/attribute-<model>-<low>-vs-<ref>
    return c
