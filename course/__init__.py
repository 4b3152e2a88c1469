"""The machinery beside the chapter's code: what makes the course fast and unbreakable.

`helpers.py` holds the book's code, the code a student reads. This package runs the
same computations faster and survives interruptions and bad input. Each module has
one concern:

- `settings`   the COURSE_* variables, checked, and the model names
- `artifacts`  every file the notebooks hand on: names, formats, atomic writes
- `data`       the dataset files: download with checksum, validation, the split
- `leakage`    which instructions the training, validation and test sets share
- `weights`    GPT-2 weights: robust downloads, the safetensors source, the offline model
- `hardware`   device choice and memory estimates
- `speed`      the fast paths: key/value cache, batched generation, packed loss, precision
- `training`   resumable fine-tuning with checkpoints
- `finetune`   notebook 05's training from the command line, on several processes with torchrun
- `lora`       LoRA (exercise 7.4): freezing, parameter counts, merging the adapters
- `responses`  notebook 07's responses: batched, resumable generation for the test set
- `judge`      the Ollama judge client: bounded, retried, resumable scoring
- `scores`     the judge's scores: repeated runs and paired comparisons
- `dpo`        notebook 10 (bonus): DPO's data, loss and resumable training
- `export`     notebook 11 (bonus): GGUF export, the Ollama Modelfile, llama.cpp, Ollama
- `colab`      the Google Colab set-up

Imports run one way: this package imports `helpers`, never the reverse.
"""
