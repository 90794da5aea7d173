"""The reference tests/sparsegpt.rs compares src/compress/sparsegpt.rs
against: a transcription of SparseGPT's `SparseGPT.add_batch` and
`SparseGPT.fasterprune` (IST-DASLab/sparsegpt, sparsegpt.py) and of the
magnitude baseline `prune_magnitude` (locuslab/wanda, lib/prune.py), kept
operation for operation (the sort index, the `<=`, the topk/scatter of n:m,
the lazy block update).

Changes from the published code, none of which touch the algorithm:
- float64 where the reference uses float32 (`W.float()`, `inp.float()`,
  the float32 H): the Rust side computes in f64, so the comparison measures
  the algorithm, not f32 rounding on two different machines.
- it works on a weight tensor rather than an nn.Linear; quantisation,
  Conv1D / Conv2d handling, DEBUG output and CUDA calls are left out.

usage: sparsegpt_ref.py CASE.safetensors...
Each CASE file holds `w` [rows, cols] float32, the calibration batches
`x0`, `x1`, ... [sequences, tokens, cols] float64 in order, and metadata
`sparsity` ("0.5" or "2:4"), `blocksize`, `percdamp`. Writes
CASE.out.safetensors with `h` (H after add_batch), `sparsegpt` (the pruned
weights, float64), `loss` (the sum of Losses) and `magnitude` (float32).
"""
import math
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class SparseGPT:
    """SparseGPT's per-layer state: the weight W [rows, columns] of a
    linear layer and the running Hessian H."""

    def __init__(self, W):
        self.W = W.clone().double()
        self.rows, self.columns = self.W.shape
        self.H = torch.zeros((self.columns, self.columns), dtype=torch.float64)
        self.nsamples = 0

    def add_batch(self, inp):
        # inp [sequences, tokens, columns]: the layer's input for one batch.
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.double()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
        """Returns the pruned W and the per-row Losses."""
        W = self.W.clone()
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        Losses = torch.zeros(self.rows, dtype=torch.float64)

        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1

            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            if prunen == 0:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]

                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

                q = w.clone()
                q[mask1[:, i]] = 0

                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2

                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2

            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        return W, Losses


def prune_magnitude(W, sparsity_ratio, prune_n=0, prune_m=0):
    """wanda's prune_magnitude for one weight, returning the pruned copy."""
    W = W.clone()
    W_metric = torch.abs(W)
    if prune_n != 0:
        W_mask = torch.zeros_like(W) == 1
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity_ratio)]
        W_mask = W_metric <= thresh
    W[W_mask] = 0
    return W


def run_case(path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        w = f.get_tensor("w")
        batches = [f.get_tensor(f"x{i}") for i in range(len([k for k in f.keys() if k.startswith("x")]))]
    if ":" in meta["sparsity"]:
        prunen, prunem = (int(v) for v in meta["sparsity"].split(":"))
        sparsity = 0.0
    else:
        prunen, prunem, sparsity = 0, 0, float(meta["sparsity"])

    gpt = SparseGPT(w)
    for x in batches:
        gpt.add_batch(x)
    pruned, losses = gpt.fasterprune(
        sparsity, prunen, prunem, blocksize=int(meta["blocksize"]), percdamp=float(meta["percdamp"])
    )
    save_file(
        {
            "h": gpt.H.contiguous(),
            "sparsegpt": pruned.contiguous(),
            "loss": torch.sum(losses).reshape(1),
            "magnitude": prune_magnitude(w, sparsity, prunen, prunem).contiguous(),
        },
        path.removesuffix(".safetensors") + ".out.safetensors",
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in sys.argv[1:]:
        run_case(case)
