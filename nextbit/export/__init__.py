"""Leaving nextbit and coming back: `nextbit export` writes a Hugging Face folder (Llama, or Qwen3 for QK-norm
models) with a model card; `nextbit import` turns such a folder back into a nextbit checkpoint.

    hf.py       the architecture mapping: config fields, tensor names, tokenizer files, chat template, shards
    card.py     the model card (README.md): what the model is, its lineage from the runs' records, what it scored
    convert.py  the two commands: ExportConfig / export_hf, ImportConfig / import_hf

Neither command needs `transformers`: the files are JSON and safetensors. Only `export --verify` loads the folder
with transformers (the [export] extra), lazily.
"""
