"""Uptrain a converted (GQA/MQA) checkpoint to recover its quality: ``python -m uptrain RECIPE.yaml``.

The GQA paper (Ainslie et al. 2023) uptrains mean-pooled checkpoints for about 5% of the
original pretraining steps; this is that loop, driven by accelerate.

Nothing is imported here, so that a command loads only what it runs. The modules:

    recipe      the YAML recipe as validated dataclasses; the step count and learning-rate schedule
    errors      RecipeError, TrainingError
    data        text -> token blocks; the training batches
    loss        per-token losses: cross-entropy, distillation KL, the chunked and Liger losses
    perplexity  the one eval loop: perplexity of a model on text, in and out of training
    student     the models of a run: the convert step, loading (quantized where asked), AdamW groups, compile
    adapters    LoRA adapters through peft on the recipe's roles; the trainable subset
    plan        the peak-memory plan of a run (``--dry-run``) and its precision
    merge       adapters merged into the base checkpoint tensor by tensor (``python -m uptrain.merge``)
    teacher     the offline teacher: top-k log-probs over the training blocks, one layer at a time
    metrics     metrics.jsonl and the tracker's hyperparameters
    checkpoints accelerate state, resume, the final checkpoint
    train       the loop (``python -m uptrain``)
    evaluate    ``python -m uptrain.evaluate``: perplexity, or a comparison (``compare``)
    compare     models side by side: tasks, perplexity, KV cache, decode speed
    downstream  lm-evaluation-harness tasks
    sample      the command behind ``python -m uptrain.sample`` (the sampler is ``kvshrink_base.sample``)
"""
