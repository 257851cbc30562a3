"""Fine-tune with your own loop: slimtune plans the chunk size, `slim_step` fills .grad exactly, torch does the rest.

python examples/custom_loop.py            # model.safetensors + my.txt in the current folder -> tuned.safetensors
python examples/custom_loop.py --quick    # a few short steps (what the tests run)
"""

import sys

import torch

import slimtune

quick = "--quick" in sys.argv
seq_len, steps = (256, 3) if quick else (16384, 100)

model = slimtune.PerformerLM.from_pretrained("model.safetensors")  # add device="cuda" on a GPU
plan = slimtune.plan(model, seq_len=seq_len, batch_size=1, mem_budget="2GB", optimizer="adam")
print(slimtune.format_plan(plan))
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
for step, windows in enumerate(slimtune.data.batches("my.txt", seq_len=seq_len, steps=steps, seed=0), start=1):
    loss = slimtune.slim_step(model, windows, chunk_size=plan.chunk_size)  # exact gradients, memory O(C)
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"step {step}: loss {loss:.4f} nats/byte")
model.save_pretrained("tuned.safetensors")
print("bpc on the first 100 kB of my.txt:", round(slimtune.evaluate(model, "my.txt", max_bytes=100_000).bpc, 4))
