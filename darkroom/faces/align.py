"""Aligning a face to the FFHQ template, and pasting the restored face back with a feathered edge.

GFPGAN and CodeFormer were trained on FFHQ crops: eyes, nose and mouth corners at fixed places of a
512x512 square. A face is brought there by the similarity transform (rotation, uniform scale,
shift) that best maps its five landmarks onto the template in the least-squares sense (Umeyama's
closed form), and the restored square is mapped back by the inverse. The blend mask is the square's
inside, faded over its outer tenth, so the face melts into the picture and every pixel outside the
square is left exactly as it was. (The webui also refines the mask with a face parsing net,
`parsing_parsenet.pth`; Darkroom uses the feathered square only.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The FFHQ 5-point template at 512x512 (left eye, right eye, nose, left and right mouth corner), as
# published with GFPGAN/facexlib (facexlib/utils/face_restoration_helper.py face_template).
FFHQ_TEMPLATE_512 = torch.tensor([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                                  [201.26117, 371.41043], [313.08905, 371.15118]], dtype=torch.float64)
BORDER_RGB = (132, 133, 135)  # what falls outside the picture in a crop: facexlib's gray (135, 133, 132 in BGR)
FEATHER = 0.1  # the fraction of the square's side over which the paste mask fades out


def template(face_size: int) -> torch.Tensor:
    """The template's five points for a square crop of `face_size` pixels."""
    return FFHQ_TEMPLATE_512 * (face_size / 512.0)


def similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 2x3 similarity matrix M minimising sum |M [src; 1] - dst|^2 (no reflection), by Umeyama's method."""
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sv, vt = torch.linalg.svd(cov)
    sign = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        sign[1] = -1.0
    rot = u @ torch.diag(sign) @ vt
    var = (s**2).sum() / len(src)
    scale = (sv * sign).sum() / var if var > 0 else torch.tensor(1.0, dtype=torch.float64)
    shift = mu_d - scale * rot @ mu_s
    return torch.cat([scale * rot, shift[:, None]], dim=1)


def invert(m: torch.Tensor) -> torch.Tensor:
    """The inverse of a 2x3 affine matrix."""
    full = torch.cat([m.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    return torch.linalg.inv(full)[:2]


def _sample(image: torch.Tensor, m_out_to_in: torch.Tensor, out_h: int, out_w: int, x0: int = 0,
            y0: int = 0) -> torch.Tensor:
    """Bilinear sampling of `image` [c, H, W] at M (x, y) for every output pixel (x0 + i, y0 + j); pixel
    centres at whole coordinates (OpenCV's warpAffine convention); outside the image reads 0."""
    c, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64) + y0,
                            torch.arange(out_w, dtype=torch.float64) + x0, indexing="ij")
    m = m_out_to_in.double()
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)  # align_corners=False
    return F.grid_sample(image[None].float(), grid[None].to(image.device, torch.float32), mode="bilinear",
                         padding_mode="zeros", align_corners=False)[0]


def warp_face(image: torch.Tensor, m: torch.Tensor, face_size: int) -> torch.Tensor:
    """The aligned crop [3, s, s] (float 0..255) of `image` [3, H, W] under M (image -> crop coordinates);
    what lies outside the picture is the webui's gray."""
    border = torch.tensor(BORDER_RGB, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return _sample(image.float() - border, invert(m), face_size, face_size) + border


def face_mask(face_size: int) -> torch.Tensor:
    """[1, s, s] weights: 1 inside, fading linearly to 0 over the outer FEATHER of the square."""
    ramp = max(1.0, face_size * FEATHER)
    pos = torch.arange(face_size, dtype=torch.float32)
    edge = torch.minimum(pos + 0.5, face_size - 0.5 - pos) / ramp
    one = edge.clamp(0, 1)
    return torch.minimum(one[:, None], one[None, :])[None]


def paste_face(image: torch.Tensor, face: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`image` [3, H, W] (float 0..255) with `face` [3, s, s] (the crop made under M) blended back in.

    Only the bounding box of the crop's outline is touched, and inside it only where the warped mask is
    above 0, so the rest of the picture keeps its exact values."""
    _, h, w = image.shape
    s = face.shape[-1]
    inv = invert(m)
    corners = torch.tensor([[0, 0, 1], [s, 0, 1], [0, s, 1], [s, s, 1]], dtype=torch.float64) - \
        torch.tensor([0.5, 0.5, 0])
    pts = corners @ inv.T
    x0, y0 = max(0, int(pts[:, 0].min().floor()) - 1), max(0, int(pts[:, 1].min().floor()) - 1)
    x1, y1 = min(w, int(pts[:, 0].max().ceil()) + 2), min(h, int(pts[:, 1].max().ceil()) + 2)
    if x1 <= x0 or y1 <= y0:
        return image
    both = torch.cat([face.float(), face_mask(s).to(face.device)], dim=0)
    warped = _sample(both, m, y1 - y0, x1 - x0, x0, y0)
    pasted, mask = warped[:3], warped[3:].clamp(0, 1)
    out = image.clone().float()
    region = out[:, y0:y1, x0:x1]
    out[:, y0:y1, x0:x1] = torch.where(mask > 0, region + mask * (pasted - region), region)
    return out
