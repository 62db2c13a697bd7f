"""distlr inside the stacks people train with: ``distlr.integrations.transformers`` (a Hugging
Face ``Trainer``); Accelerate is ``LRFinder.from_accelerator``; FSDP2 models are a backend."""
