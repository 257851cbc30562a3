"""SLiM inside your own torch.nn.Module and training loop: a Performer with a learned soft prompt of your own,
gradient accumulation over micro-batches, and a learning-rate schedule from torch.

slim_step only needs an object that behaves like slimtune.PerformerLM, so a wrapper module that owns the
Performer (plus its own parameters) trains with exact SLiM gradients for all of them. Here the extra parameter is
a per-byte bias added to the output logits.

    python examples/own_module.py [--quick]    # model.safetensors + my.txt here -> tuned.safetensors
"""

import sys

import torch
from torch import nn

import slimtune

quick = "--quick" in sys.argv
seq_len, micro_batches, steps = (128, 2, 2) if quick else (8192, 4, 50)


class Tuned(nn.Module):
    """The pretrained Performer, plus a learned bias on its output logits (a tiny adapter of your own)."""

    def __init__(self, performer: slimtune.PerformerLM):
        super().__init__()
        self.performer = performer
        self.logit_bias = nn.Parameter(torch.zeros(performer.config.vocab_size))
        performer.output_logit_map.register_forward_hook(lambda module, args, out: out + self.logit_bias)


model = Tuned(slimtune.PerformerLM.from_pretrained("model.safetensors"))
performer = model.performer
plan = slimtune.plan(performer, seq_len=seq_len, mem_budget="2GB")
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-4, total_steps=steps)
data = slimtune.data.batches("my.txt", seq_len=seq_len, steps=steps * micro_batches, seed=0)
for step in range(1, steps + 1):
    total = 0.0
    for _ in range(micro_batches):  # gradient accumulation: slim_step adds into .grad
        windows = next(data)
        total += slimtune.slim_step(performer, windows, chunk_size=plan.chunk_size)
    for p in model.parameters():  # the mean over the micro-batches
        if p.grad is not None:
            p.grad /= micro_batches
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    print(
        f"step {step}: loss {total / micro_batches:.4f}, lr {scheduler.get_last_lr()[0]:.2e}, "
        f"|bias| {model.logit_bias.norm():.4f}"
    )
with torch.no_grad():  # fold the bias into the Performer's own output bias: a plain checkpoint again
    performer.output_logit_map.bias += model.logit_bias
    model.logit_bias.zero_()
performer.save_pretrained("tuned.safetensors")
