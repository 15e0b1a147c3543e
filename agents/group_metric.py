"""How much a latent direction moves one FLAME group's decoded motion: the metric of ``algo.group_kl``.

The paper's KL weighs every latent direction alike, ``||mu_p - mu_q||^2 / (2 sigma^2 dt)``. The VAE's
latent is shared by the six groups, so a step that adds expression motion can carry jaw motion with it,
and that KL cannot tell the two apart (docs/benchmarks.md, "the jaw motion that comes with an expr+rot
reward": a latent move of a few per cent of the latents' norm gives GDPO's expr+rot motion with the
supervised jaw). ``algo.group_kl={jaw: beta_g}`` adds the same KL measured in the metric

    M_g = E[J_g^T J_g] / lambda_max,     J_g = d(group g's decoded frames of a token) / d(latent)   (r C_g, Dv)

(expectation over the train windows' tokens, frames in the VAE's normalised units), so a direction that
moves group g's motion as much as any can weighs 1 (the plain KL's weight) and one that leaves it still
weighs 0. ``J_g`` is measured by central differences of the decoder at the windows' own latents, every
token shifted at once (a policy's drift is shared by neighbouring tokens, and the decoder mixes them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..envs.windows import decode_normalised


@torch.no_grad()
def decoded_group_metric(vae, z: Tensor, channels: slice, h: float = 1e-2) -> Tensor:
    """``M (Dv, Dv)``: symmetric, positive semi-definite, largest eigenvalue 1, for the frames' ``channels``
    decoded from latents ``z (B, N, Dv)`` (module docstring). ``h``: the difference step in latent units."""
    if z.dim() != 3 or not torch.isfinite(z).all():
        raise ValueError(f"decoded_group_metric: need finite latents (B, N, Dv), got shape {tuple(z.shape)}")
    if not h > 0:
        raise ValueError(f"decoded_group_metric: h must be > 0, got {h}")
    B, N, Dv = z.shape
    eye = torch.eye(Dv, dtype=z.dtype, device=z.device) * h  # (Dv, Dv)
    cols = []
    for i in range(Dv):
        up, down = decode_normalised(vae, z + eye[i]), decode_normalised(vae, z - eye[i])  # (B, N r, 67) each
        cols.append(((up - down)[..., channels] / (2 * h)).reshape(B, N, -1))  # (B, N, r C_g)
    J = torch.stack(cols, dim=-1)  # (B, N, r C_g, Dv)
    gram = torch.einsum("bnki,bnkj->ij", J, J) / (B * N)  # (Dv, Dv)
    top = torch.linalg.eigvalsh(gram.double()).max().item()
    if not top > 0:
        raise ValueError(f"decoded_group_metric: the decoder's frames {channels} do not move with the latent "
                         f"(largest eigenvalue {top}); a group the VAE does not model?")
    return (gram / top).float()  # (Dv, Dv)
