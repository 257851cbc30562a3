"""The named choices of the library and the command line (optimizer, precision, state recovery, ...). No torch
here: the command line reads this module for its help.

Each is a `str` enum: members compare, hash and print as their values (`Optimizer.ADAM == "adam"`), so options
read from a recipe, a saved run or a caller's string work unchanged, and typer lists and validates them on the
command line. `Choice.parse` turns a string into a member or raises ConfigError naming the allowed values.
"""

from __future__ import annotations

from enum import Enum

from .errors import ConfigError


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    __hash__ = str.__hash__  # a member finds the entries of its value in dicts and sets

    @classmethod
    def parse(cls, value, what: str):
        """`value` as a member of this choice; ConfigError naming the parameter `what` and the allowed values
        otherwise."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ConfigError(f"`{what}` must be one of {allowed}, got {value!r}", params=(what,)) from None


ADAMW_WEIGHT_DECAY = 0.01  # adamw's decay when none is given


class Optimizer(Choice):
    SGD = "sgd"  # plain SGD, no momentum, no state
    ADAM = "adam"
    ADAMW = "adamw"  # decoupled weight decay on the weight matrices
    ADAFACTOR = "adafactor"  # factored second moments (rows + columns of each matrix), no first moment

    @property
    def default_weight_decay(self) -> float:
        """The weight decay when none is given: ADAMW_WEIGHT_DECAY for adamw, else 0."""
        return ADAMW_WEIGHT_DECAY if self is Optimizer.ADAMW else 0.0


class BenchOptimizer(Choice):
    NONE = "none"  # gradients only
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"


class Precision(Choice):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast: bf16 matmuls; fp32 weights, gradients, states and loss

    @property
    def dtype(self):
        """The autocast torch.dtype; None: the weights' own dtype, no autocast."""
        import torch  # here, not at the top: the command line's help reads this module and must not load torch

        return torch.bfloat16 if self is Precision.BF16 else None


class BaseDtype(Choice):
    FP32 = "fp32"
    BF16 = "bf16"  # the frozen layers' weights in bf16 (2 bytes a value), computed under bf16 autocast
    INT8 = "int8"  # the frozen layers' weights quantized (quant.py: 1 byte a value, an fp32 scale a row)
    NF4 = "nf4"  # 4-bit NormalFloat with an fp32 scale per 64 values (0.5625 bytes a value)

    @property
    def quantized(self) -> bool:
        return self in (BaseDtype.INT8, BaseDtype.NF4)

    @property
    def held(self):
        """What the frozen layers' weights are held in: a torch.dtype, or a quantized format's name (quant.py)."""
        import torch  # here, not at the top: the command line's help reads this module and must not load torch

        return self.value if self.quantized else torch.bfloat16 if self is BaseDtype.BF16 else torch.float32

    def compute(self, asked) -> Precision:
        """The one rule of a base's compute precision: a bf16 or quantized base computes under bf16 autocast (a
        quantized weight is dequantized into bf16, QLoRA's compute dtype: in fp32 a LoRA step on nf4 took 2.5x the
        bf16 base's, benchmarks/RESULTS.md); an fp32 base in the precision asked for."""
        return Precision.parse(asked, "precision") if self is BaseDtype.FP32 else Precision.BF16


# The linear maps LoRA may adapt (CONTRACT.md section 4), and the default: every layer's (all but the output map).
LORA_TARGETS = ("q_map", "k_map", "v_map", "U_map", "V_map", "output_logit_map")
LORA_DEFAULT_TARGETS = LORA_TARGETS[:5]
LORA_ALPHA_PER_RANK = 2.0  # the default scale: alpha = 2 R
LORA_COMPARED_RANK = 8  # the LoRA rank `plan` compares when the run asked for full fine-tuning, and `inspect` costs


class Recovery(Choice):
    SUBTRACT64 = "subtract64"  # the paper's subtraction with float64 states (default)
    SUBTRACT = "subtract"  # the paper as published: states in the compute dtype
    STORE = "store"  # keep every chunk's start states from the forward sweep


class Schedule(Choice):
    CONSTANT = "constant"
    COSINE = "cosine"  # cosine decay to 0 after the warmup


class LayerNorm(Choice):
    POST = "post"  # x + LN(f(x)), the reference default (on_gptln = true)
    PRE = "pre"  # x + f(LN(x))

    @property
    def on_gptln(self) -> bool:
        return self is LayerNorm.POST


class ExportFormat(Choice):
    SAFETENSORS = "safetensors"  # one .safetensors file
    HF = "hf"  # a folder: model.safetensors, config.json and the modeling code


class ExportDtype(Choice):
    AUTO = "auto"  # each tensor in its input dtype
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(self.value)


class Heap(Choice):
    MANAGED = "managed"  # slimtune sets glibc's thresholds: "tight" while planning, then the plan's (memory.py)
    SYSTEM = "system"  # glibc's own dynamic threshold, untouched


class ChunkRule(Choice):
    """How the planner picks C among those whose predicted peak fits the budget."""

    FASTEST = "auto"  # the one predicted fastest (on a GPU normally the largest; on a CPU often a smaller one)
    LARGEST = "max"  # the largest (the paper's rule)


class Task(Choice):
    TEXT = "text"  # windows of a byte file
    COPY = "copy"  # the paper's synthetic copying task


class DataDtype(Choice):
    UINT16 = "uint16"  # a .bin file's ids: nanoGPT's train.bin
    UINT32 = "uint32"  # vocabularies beyond 65,536


class Adapt(Choice):
    ONE_STEP = "one-step"  # the paper's on-device protocol
