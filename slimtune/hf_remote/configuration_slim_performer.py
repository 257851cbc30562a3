"""The SLiM Performer's configuration for Hugging Face transformers (written by an export in the hf format)."""

from transformers import PretrainedConfig


class SLiMPerformerConfig(PretrainedConfig):
    model_type = "slim_performer"
    # transformers' names for the sizes (generate's default cache reads num_hidden_layers).
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "hidden_dim", "num_attention_heads": "n_heads"}

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_dim: int = 256,
        n_layers: int = 3,
        ffn_dim: int = 1024,
        n_heads: int = 4,
        feature_type: str = "sqr",
        on_gptln: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.n_layers = n_layers
        self.ffn_dim = ffn_dim
        self.n_heads = n_heads
        self.feature_type = feature_type
        self.on_gptln = on_gptln
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
