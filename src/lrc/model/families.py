"""Where each supported model family keeps the weights LRC needs, described as data.

Llama, Mistral, Qwen2 and Qwen3 share Hugging Face's decoder layout (`model.layers[i].self_attn.q_proj`, ...);
they differ in per-head q/k norms (Qwen3), projection biases (Qwen2 always, Llama optionally) and sliding
windows (handled by transformers itself from the config). A new family that follows the same layout is one
line in `FAMILIES`; one that does not needs its own `Family` with other names.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrc.errors import UserError

# The seven clone terms of a layer, in the order the spec lists them.
INPUT_SIDE = ("q", "k", "v", "gate", "up")  # projection acts on the input (d_T -> d_S) side
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """Module names inside a `*ForCausalLM` of one family (paths are relative to the causal LM)."""

    model_type: str
    base: str = "model"  # the decoder stack inside the causal LM
    layers: str = "layers"  # relative to `base`
    embed: str = "embed_tokens"  # relative to `base`
    final_norm: str = "norm"  # relative to `base`
    head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    qk_norms: tuple[str, ...] = ()
    # role -> (block, linear) inside a layer
    linears: tuple[tuple[str, str, str], ...] = (
        ("q", "self_attn", "q_proj"),
        ("k", "self_attn", "k_proj"),
        ("v", "self_attn", "v_proj"),
        ("o", "self_attn", "o_proj"),
        ("gate", "mlp", "gate_proj"),
        ("up", "mlp", "up_proj"),
        ("down", "mlp", "down_proj"),
    )

    def linear_path(self, role: str) -> str:
        """Path of a role's linear inside a decoder layer, e.g. 'self_attn.q_proj'."""
        for r, block, name in self.linears:
            if r == role:
                return f"{block}.{name}"
        raise KeyError(role)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3", qk_norms=("q_norm", "k_norm")),
}


def family_for(config) -> Family:
    """The adapter for a transformers config, or a UserError listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UserError(
            f"model type '{model_type}' is not supported by LRC; supported families: {supported}"
        )
    return FAMILIES[model_type]
