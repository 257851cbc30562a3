"""The SLiM Performer language model for Hugging Face transformers (written by an export in the hf format).

The math of slimtune's docs/format.md in plain torch, with the reference code's parameter names, so the exported
model.safetensors loads as it is: positions as sin/cos of the absolute index, causal linear attention
out_t = phi(q_t) . S_t / (phi(q_t) . z_t + 1e-16) with prefix sums S_t, z_t, no output projection, post or pre
layer norm. FAVOR+ feature maps need a random draw per use; this file supports the deterministic maps (sqr,
relu, elu+1, abs).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_slim_performer import SLiMPerformerConfig

FEATURES = {"sqr": lambda x: x * x, "relu": F.relu, "elu+1": lambda x: F.elu(x) + 1.0, "abs": torch.abs}


class SLiMPerformerAttention(nn.Module):
    def __init__(self, config: SLiMPerformerConfig):
        super().__init__()
        d = config.hidden_dim
        self.n_heads, self.phi = config.n_heads, FEATURES[config.feature_type]
        self.q_map, self.k_map, self.v_map = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        heads = lambda y: y.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        q, k, v = self.phi(heads(self.q_map(x))), self.phi(heads(self.k_map(x))), heads(self.v_map(x))
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the last column accumulates z
        prefix = (k.unsqueeze(-1) * v1.unsqueeze(-2)).cumsum(2)  # [B, H, T, M, D + 1]
        num_den = (q.unsqueeze(-1) * prefix).sum(-2)
        out = num_den[..., :-1] / (num_den[..., -1:] + 1e-16)
        return out.transpose(1, 2).reshape(B, T, d)


class SLiMPerformerLayer(nn.Module):
    def __init__(self, config: SLiMPerformerConfig):
        super().__init__()
        d = config.hidden_dim
        self.post_norm = config.on_gptln
        self.attention = SLiMPerformerAttention(config)
        self.U_map, self.V_map = nn.Linear(d, config.ffn_dim), nn.Linear(config.ffn_dim, d)
        self.layernorm1, self.layernorm2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ffn = lambda y: self.V_map(F.gelu(self.U_map(y)))  # noqa: E731
        if self.post_norm:
            x = x + self.layernorm1(self.attention(x))
            return x + self.layernorm2(ffn(x))
        x = x + self.attention(self.layernorm1(x))
        return x + ffn(self.layernorm2(x))


class SLiMPerformerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SLiMPerformerConfig
    base_model_prefix = "slim_performer"
    _no_split_modules = ["SLiMPerformerLayer"]

    def __init__(self, config: SLiMPerformerConfig):
        super().__init__(config)
        if config.feature_type not in FEATURES:
            raise ValueError(f"feature type {config.feature_type!r} needs a random draw: load it with slimtune")
        d = config.hidden_dim
        self.input_map = nn.Embedding(config.vocab_size, d // 2)
        self.layers = nn.ModuleList(SLiMPerformerLayer(config) for _ in range(config.n_layers))
        self.output_logit_map = nn.Linear(d, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.input_map

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        # No cache: each new token reruns the whole prefix (slimtune's own `generate` runs in recurrent mode).
        return {"input_ids": input_ids}

    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        B, T = input_ids.shape
        half = self.config.hidden_dim // 2
        device, f64 = input_ids.device, torch.float64
        w = torch.exp(torch.arange(0, half, 2, device=device, dtype=f64) * (-math.log(10000.0) / half))
        angles = (torch.arange(T, device=device, dtype=f64)[:, None] * w).to(self.input_map.weight.dtype)
        pos = torch.cat([angles.sin(), angles.cos()], dim=-1).expand(B, -1, -1)
        x = torch.cat([self.input_map(input_ids), pos], dim=-1)
        for layer in self.layers:
            x = layer(x)
        logits = self.output_logit_map(x)
        loss = None
        if labels is not None:  # labels are the inputs, as in transformers' causal LMs: shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)
