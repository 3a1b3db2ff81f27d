"""The seam to Hugging Face causal LMs: where a model's parts are found (``adapter``) and
where its attention q/k/v are captured (``capture``). Imports only torch (and PEFT /
transformers inside the functions that need them), so every floor above may use it."""
