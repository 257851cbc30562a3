"""Code written beside the weights of a `--format hf` export, so that Hugging Face transformers loads the folder
with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. These files import torch and
transformers only (never slimtune): the folder works wherever transformers does."""
