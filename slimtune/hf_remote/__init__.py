"""Code written beside the weights of an export in the hf format, so that Hugging Face transformers loads the folder
with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. These files import torch and
transformers only (never slimtune): the folder works wherever transformers does."""
