"""The trainer's training package: one LoRA training job, run by the worker as a separate process.

``spec`` holds the job description and its result (the process boundary), ``model`` loads the base
model and wraps it with LoRA, ``data`` turns samples into token ids, and ``recipe`` is the job itself
(``python -m streamengine.training.recipe SPEC.json``). Only torch/transformers/peft live here.
"""
