"""bitsandbytes' NF4 quantisation of every tensor of a safetensors file: the
reference tests/nf4.rs compares `sharedmoe::compress::nf4` against, byte
for byte.

usage: bnb_nf4.py IN.safetensors OUT.safetensors

For each float32 tensor NAME of IN and each DQ in (0, 1), on CPU:
    packed, state = quantize_4bit(t, blocksize=64, compress_statistics=DQ,
                                  quant_type="nf4")
and OUT gets, for the weight name W = "NAME.dqDQ", every tensor of
state.as_dict(packed=True) under "W.<key>" (the serialized layout:
W.absmax, W.quant_map, W.nested_absmax, W.nested_quant_map and the JSON
of W.quant_state.bitsandbytes__nf4), the packed weight itself under "W",
and dequantize_4bit(packed, state) under "W.dequantized".

One process handles every tensor: importing torch costs seconds.
"""
import os
import sys

# bnb wraps its generic 4-bit dequantisation (taken for odd last
# dimensions) in torch.compile: about 20 s of inductor compilation for our
# shapes. Eager runs the same single f32 multiply per value; with and
# without compilation the output file was checked to be byte-identical.
os.environ["TORCHDYNAMO_DISABLE"] = "1"

import torch  # noqa: E402

# torch's CPU mean (bnb's double-quantisation offset) splits sums of more
# than 32768 values across threads, and the split changes the rounding.
# One thread: the sequential cascade sum the Rust side reproduces.
torch.set_num_threads(1)

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# The layout and float operations transcribed in src/compress/nf4.rs are
# those of this release; another one must be checked again.
assert bitsandbytes.__version__ == "0.50.2", bitsandbytes.__version__


def main():
    src, dst = sys.argv[1], sys.argv[2]
    out = {}
    for name, t in load_file(src).items():
        assert t.dtype == torch.float32, (name, t.dtype)
        for dq in (0, 1):
            w = f"{name}.dq{dq}"
            packed, state = F.quantize_4bit(
                t, blocksize=64, compress_statistics=bool(dq), quant_type="nf4"
            )
            out[w] = packed
            for key, value in state.as_dict(packed=True).items():
                out[f"{w}.{key}"] = value.contiguous()
            out[f"{w}.dequantized"] = F.dequantize_4bit(packed, state)
    save_file(out, dst)


if __name__ == "__main__":
    main()
