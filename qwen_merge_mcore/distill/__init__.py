"""Stage-3 distillation data engine: teacher replies (`generate`), verdicts (`judge`), the
stage-3 mix (`assemble`). The vLLM engine runs in a worker process under vLLM's own python
(`worker.py`); everything else runs in the project's environment."""
