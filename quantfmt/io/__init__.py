"""Reading and writing model files: the safetensors container, sharded checkpoints and GGUF.

Each reader turns a file into a Model of lazy tensor sources (name, tag, shape, a way to
load the bytes: a view of the mapped file), after validating everything its header claims;
each writer streams tensor plans into an atomic output. `files` holds what they share:
mapping, page release, output checks, the atomic output and the one streaming writer loop.
Nothing here decides formats (that is the recipe's job) or knows about operations.
"""
