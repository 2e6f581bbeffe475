"""The CPU inference layer: readying a trained `GPT` for decoding by swapping its modules for faster
ones. It imports the model; the model knows nothing of it.

- `prepare.py`: `prepare_for_inference` (the weights' forms, the module swaps) and the KV cache's
  dtype for a prepared model (`kv_cache_dtype`).
- `packed.py`: `PackedLinear`, a linear layer on a weight oneDNN has laid out ahead of time.
- `int8.py`: `Int8Linear`, int8 weights with a scale per row, and which kernel serves how many rows.
- `fbgemm.py`: FBGEMM's float16-weight matmul, called past PyTorch's Python dispatch.

QuillGPT's own C++ kernels (decode attention, int8 linear) and their build are a leaf package of their
own, `quillgpt.kernels`: the KV cache (`quillgpt.kvcache`) uses the attention kernel below the model.
"""
