"""The offline demo: SmolLM2-135M-Instruct made MQA, evaluated and uptrained back (``python -m kvshrink.demo``).

``demo`` runs the steps; ``kvshrink.assets`` materializes the model and the plays from their PyPI packages;
``cloze`` makes the verse cloze task.
"""
