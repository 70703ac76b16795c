"""Tiny annotator weight files in the real key layouts (tests only).

- ControlNetHED.pth: the HED network with narrow widths (4-8 channels instead of 64-512). With
  `brightness=True` its first side output is set to answer to brightness (white pixels give edge
  values near 1, black near 0) and the other four to nothing, so a test can tell where the map lands.
- sk_model.pth / sk_model2.pth: the line art ResNet generator at 4 channels; netG.pth: the U-Net at 2.
  `constant` sets the last layer to a fixed output (1: all line, 0: none) to check the inversion.
- body_pose_model.pth: the OpenPose body model at 4-8 channels (the 38 PAF and 19 heatmap outputs kept).
  `blank=True` zeroes its last heatmap layer, so no keypoint is found and the map is black.
- depth_anything_vitl14.pth: the original Depth Anything checkpoint's key layout (a DINOv2 ViT under
  `pretrained.`, the DPT head under `depth_head.`), written out here from the original network's layers
  and not from Darkroom's renaming, at width 64 with 4 blocks.
- dpt_hybrid-midas-501f0c75.pt: the original MiDaS v3 DPT-Hybrid layout (timm's ViT under
  `pretrained.model.` with its ResNet stem in `patch_embed.backbone`, the readouts in
  `pretrained.act_postprocess3/4`, the neck and head in `scratch.`), half-width ResNet, a 64-wide ViT.
- mlsd_large_512_fp32.pth and table5_pidinet.pth at their released sizes (1.5 M and 0.7 M weights), random;
  PiDiNet's pixel-difference weights stored untransformed (3x3), as in the file.
- hand_pose_model.pth / facenet.pth: the OpenPose hand (22 maps) and face (71 maps) nets at 4-8 channels.
- 7_model.pth (TEED) at its released size (58,910 weights), random, every key and shape written out here
  from the authors' network rather than taken from Darkroom's module.
- erika.pth (manga line, lineart_anime_denoise): the res_skip network, narrow by default, at its released
  widths (43.1 M weights) with `widths=None`.
- ControlNetLama.pth (inpaint_only+lama): the LaMa generator at width 8 with 2 residual blocks (the released
  file: 64 and 18, 51 M weights).
- UNet.pth (seg_anime_face): the MobileNetV2 U-Net at its released size, random.
- res101.pth (depth_leres): LeReS's ResNeXt and decoder, narrow, under `depth_model` as the file keeps it.
- dsine.pt (normal_dsine): DSINE on the same narrow EfficientNet, head 32 wide.
- scannet.pt (normal_bae): EfficientNet-B5 and the NNET decoder narrowed and shortened, in the file's wrapping.
The real files are fp16 (HED) or fp32 (line art, OpenPose, depth, M-LSD, PiDiNet); `dtype` chooses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from darkroom.control.annotators.hed import HED
from darkroom.control.annotators.lineart import AnimeUnet, SketchGenerator
from darkroom.control.annotators.openpose import BodyPoseNet, Widths


def hed_state(*, widths=(4, 4, 8, 8, 8), seed: int = 0, brightness: bool = False) -> dict:
    torch.manual_seed(seed)
    net = HED(widths)
    if brightness:
        with torch.no_grad():
            for i in range(1, 6):
                block = getattr(net, f"block{i}")
                block.projection.weight.zero_()
                block.projection.bias.zero_()
            net.norm.zero_()
            first, second = net.block1.convs
            first.weight.zero_()
            first.bias.zero_()
            first.weight[0, :, 1, 1] = 1.0 / (3 * 255.0)  # channel 0: mean brightness in [0, 1]
            second.weight.zero_()
            second.bias.zero_()
            second.weight[0, 0, 1, 1] = 1.0
            net.block1.projection.weight[0, 0] = 100.0  # mean over five outputs: (100 b - 50) / 5 = +-10
            net.block1.projection.bias.fill_(-50.0)
    return net.state_dict()


def sketch_state(*, width: int = 4, blocks: int = 3, seed: int = 0, constant: float | None = None) -> dict:
    torch.manual_seed(seed)
    net = SketchGenerator(width, blocks)
    if constant is not None:
        with torch.no_grad():
            net.model4[1].weight.zero_()
            net.model4[1].bias.fill_(20.0 if constant > 0.5 else -20.0)
    return net.state_dict()


def anime_state(*, width: int = 2, levels: int = 8, seed: int = 0, constant: float | None = None) -> dict:
    torch.manual_seed(seed)
    net = AnimeUnet(width, levels)
    if constant is not None:
        with torch.no_grad():
            up = net.model.model[3]
            up.weight.zero_()
            up.bias.fill_(20.0 if constant > 0.5 else -20.0)
    return net.state_dict()


def body_pose_state(*, seed: int = 0, blank: bool = False) -> dict:
    torch.manual_seed(seed)
    net = BodyPoseNet(Widths(c1=4, c2=4, c3=8, c4=8, cpm=6, features=4, branch=8, wide=8, stage=8))
    if blank:
        with torch.no_grad():
            net.Mconv7_stage6_L2.weight.zero_()
            net.Mconv7_stage6_L2.bias.zero_()
    return net.state_dict()


def depth_anything_state(*, hidden: int = 64, blocks: int = 4, side: int = 4, patch: int = 14,
                         outs=(8, 16, 32, 32), features: int = 16, head: int = 32, seed: int = 0,
                         meta: bool = False) -> dict:
    """Random tensors under the original names: DINOv2 (cls/mask tokens, position embedding for a `side`
    x `side` grid, fused qkv, layer scales) and DPTHead (projects, resize_layers 0, 1 and 3, scratch).
    `meta`: shapes only (no memory), to check the released sizes."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=g) * 0.05

    state = {"pretrained.cls_token": t(1, 1, hidden), "pretrained.mask_token": t(1, hidden),
             "pretrained.pos_embed": t(1, side * side + 1, hidden),
             "pretrained.patch_embed.proj.weight": t(hidden, 3, patch, patch),
             "pretrained.patch_embed.proj.bias": t(hidden),
             "pretrained.norm.weight": 1 + t(hidden), "pretrained.norm.bias": t(hidden)}
    for i in range(blocks):
        b = f"pretrained.blocks.{i}."
        state.update({b + "norm1.weight": 1 + t(hidden), b + "norm1.bias": t(hidden),
                      b + "attn.qkv.weight": t(3 * hidden, hidden), b + "attn.qkv.bias": t(3 * hidden),
                      b + "attn.proj.weight": t(hidden, hidden), b + "attn.proj.bias": t(hidden),
                      b + "ls1.gamma": 1 + t(hidden), b + "norm2.weight": 1 + t(hidden), b + "norm2.bias": t(hidden),
                      b + "mlp.fc1.weight": t(4 * hidden, hidden), b + "mlp.fc1.bias": t(4 * hidden),
                      b + "mlp.fc2.weight": t(hidden, 4 * hidden), b + "mlp.fc2.bias": t(hidden),
                      b + "ls2.gamma": 1 + t(hidden)})
    h = "depth_head."
    for i, out in enumerate(outs):
        state[f"{h}projects.{i}.weight"], state[f"{h}projects.{i}.bias"] = t(out, hidden, 1, 1), t(out)
        kernel = {0: 4, 1: 2, 3: 3}.get(i)
        if kernel:  # 0, 1: transposed convolutions up 4x and 2x; 2: identity; 3: a stride-2 convolution
            state[f"{h}resize_layers.{i}.weight"] = t(out, out, kernel, kernel)
            state[f"{h}resize_layers.{i}.bias"] = t(out)
        state[f"{h}scratch.layer{i + 1}_rn.weight"] = t(features, out, 3, 3)
        r = f"{h}scratch.refinenet{i + 1}."
        state[r + "out_conv.weight"], state[r + "out_conv.bias"] = t(features, features, 1, 1), t(features)
        for unit in ("resConfUnit1", "resConfUnit2"):
            for conv in ("conv1", "conv2"):
                state[f"{r}{unit}.{conv}.weight"] = t(features, features, 3, 3)
                state[f"{r}{unit}.{conv}.bias"] = t(features)
    state.update({f"{h}scratch.output_conv1.weight": t(features // 2, features, 3, 3),
                  f"{h}scratch.output_conv1.bias": t(features // 2),
                  f"{h}scratch.output_conv2.0.weight": t(head, features // 2, 3, 3),
                  f"{h}scratch.output_conv2.0.bias": t(head),
                  f"{h}scratch.output_conv2.2.weight": t(1, head, 1, 1), f"{h}scratch.output_conv2.2.bias": t(1) + 1})
    return state


def midas_hybrid_state(*, hidden: int = 64, blocks: int = 6, side: int = 4, stem: int = 32,
                       stages=((1, 128), (1, 256), (2, 512)), outs=(128, 256, 64, 64), features: int = 16,
                       seed: int = 0, meta: bool = False) -> dict:
    """Random tensors under the original names. `stages`: (bottlenecks, output width) of the three ResNet
    stages (bottleneck width a quarter of the output; group norm needs multiples of 32); `outs`: the
    neck's four input widths (the first two are the ResNet stages' outputs)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=g) * 0.05

    def norm(prefix, n):
        return {prefix + ".weight": 1 + t(n), prefix + ".bias": t(n)}

    vit, resnet = "pretrained.model.", "pretrained.model.patch_embed.backbone."
    state = {vit + "cls_token": t(1, 1, hidden), vit + "pos_embed": t(1, side * side + 1, hidden),
             resnet + "stem.conv.weight": t(stem, 3, 7, 7), **norm(resnet + "stem.norm", stem),
             vit + "head.weight": t(1000, hidden), vit + "head.bias": t(1000), **norm(vit + "norm", hidden)}
    cin = stem
    for s, (count, width) in enumerate(stages):
        mid = width // 4
        for b in range(count):
            p = f"{resnet}stages.{s}.blocks.{b}."
            if b == 0:
                state[p + "downsample.conv.weight"] = t(width, cin, 1, 1)
                state.update(norm(p + "downsample.norm", width))
            for i, (ci, co, k) in enumerate(((cin if b == 0 else width, mid, 1), (mid, mid, 3), (mid, width, 1)), 1):
                state[f"{p}conv{i}.weight"] = t(co, ci, k, k)
                state.update(norm(f"{p}norm{i}", co))
        cin = width
    state[vit + "patch_embed.proj.weight"], state[vit + "patch_embed.proj.bias"] = t(hidden, cin, 1, 1), t(hidden)
    for i in range(blocks):
        p = f"{vit}blocks.{i}."
        state.update({**norm(p + "norm1", hidden), p + "attn.qkv.weight": t(3 * hidden, hidden),
                      p + "attn.qkv.bias": t(3 * hidden), p + "attn.proj.weight": t(hidden, hidden),
                      p + "attn.proj.bias": t(hidden), **norm(p + "norm2", hidden),
                      p + "mlp.fc1.weight": t(4 * hidden, hidden), p + "mlp.fc1.bias": t(4 * hidden),
                      p + "mlp.fc2.weight": t(hidden, 4 * hidden), p + "mlp.fc2.bias": t(hidden)})
    for n in (3, 4):  # ViT outputs: readout projection, 1x1 convolution, (4:) a stride-2 3x3 convolution
        p = f"pretrained.act_postprocess{n}."
        out = outs[n - 1]
        state.update({p + "0.project.0.weight": t(hidden, 2 * hidden), p + "0.project.0.bias": t(hidden),
                      p + "3.weight": t(out, hidden, 1, 1), p + "3.bias": t(out)})
        if n == 4:
            state[p + "4.weight"], state[p + "4.bias"] = t(out, out, 3, 3), t(out)
    for i, out in enumerate(outs, 1):
        state[f"scratch.layer{i}_rn.weight"] = t(features, out, 3, 3)
        r = f"scratch.refinenet{i}."
        state[r + "out_conv.weight"], state[r + "out_conv.bias"] = t(features, features, 1, 1), t(features)
        for unit in ("resConfUnit1", "resConfUnit2"):
            for conv in ("conv1", "conv2"):
                state[f"{r}{unit}.{conv}.weight"] = t(features, features, 3, 3)
                state[f"{r}{unit}.{conv}.bias"] = t(features)
    state.update({"scratch.output_conv.0.weight": t(features // 2, features, 3, 3),
                  "scratch.output_conv.0.bias": t(features // 2),
                  "scratch.output_conv.2.weight": t(32, features // 2, 3, 3), "scratch.output_conv.2.bias": t(32),
                  "scratch.output_conv.4.weight": t(1, 32, 1, 1), "scratch.output_conv.4.bias": t(1) + 1})
    return state


def save(state: dict, path: Path, *, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    """Write `state` as a .pth, or a .safetensors by the name (optionally cast, optionally with the
    DataParallel `module.` prefix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.to(dtype) for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


def mlsd_state(*, seed: int = 0) -> dict:
    """mlsd_large_512_fp32.pth at its released size (1.5 M weights), random, batch-norm variances positive."""
    from darkroom.control.annotators.mlsd import MLSD

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in MLSD().state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.2
    return state


def pidinet_state(*, width: int = 60, dil: int = 24, seed: int = 0) -> dict:
    """table5_pidinet.pth's layout (60 and 24 are the released widths): the pixel-difference weights as
    trained, so the radial blocks' depthwise weights are 3x3 as in the file, not the 5x5 they convert to."""
    from darkroom.control.annotators.pidinet import PiDiNet, block_kinds

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in PiDiNet(width, dil).state_dict().items():
        shape = (value.shape[0], value.shape[1], 3, 3) if block_kinds().get(key) == "rd" else value.shape
        state[key] = torch.randn(shape, generator=gen) * 0.3
    return state


def part_pose_state(outputs: int, *, seed: int = 0) -> dict:
    """hand_pose_model.pth (outputs=22) or facenet.pth (71) at 4-8 channels, the map count kept."""
    from darkroom.control.annotators.openpose_parts import PartNet, PartWidths

    torch.manual_seed(seed)
    return PartNet(outputs, PartWidths(c1=4, c2=4, c3=8, c4=8, cpm=8, wide=8, stage=8)).state_dict()


def _tiny_effnet_stages() -> tuple:
    """EfficientNet-B5's seven stages one or two blocks deep and 4-16 channels wide, its kernels and strides."""
    from darkroom.control.annotators.normalbae import STRIDES, Block

    stages, cin = [], 8
    for i, (stride, kernel) in enumerate(zip(STRIDES, (3, 3, 5, 3, 5, 5, 3), strict=True)):
        cout = 4 + 2 * i
        blocks = []
        for b in range(1 if i in (0, 6) else 2):
            expand = i > 0
            blocks.append(Block(cin, cout, 8 if expand else cin, kernel, stride if b == 0 else 1, 2, expand))
            cin = cout
        stages.append(tuple(blocks))
    return tuple(stages)


def normal_bae_state(*, seed: int = 0) -> dict:
    """scannet.pt's layout (encoder.original_model.* as geffnet names EfficientNet-B5, decoder.*) with the seven
    stages one or two blocks deep and 4-16 channels wide; the real kernel sizes and strides. Saved as the
    real file is: {"model": state} with DataParallel's "module." prefixes (see normal_bae_file)."""
    from darkroom.control.annotators.normalbae import NormalBae, Spec

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in NormalBae(Spec(8, _tiny_effnet_stages(), 16, (16, 8, 8, 8), 8)).state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.3
    return state


def normal_bae_file(state: dict, path: Path) -> Path:
    """`state` written as scannet.pt is: {"model": {"module." + key: tensor}}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    return path


_TEED_SHAPES = {  # key prefix: weight shape (a, b, kernel); the bias has a (the transposed ones have a == b)
    "block_1.conv1": (16, 3, 3), "block_1.conv2": (16, 16, 3), "block_2.conv1": (32, 16, 3),
    "block_2.conv2": (32, 32, 3), "dblock_3.denselayer1.conv1": (48, 32, 3), "dblock_3.denselayer1.conv2": (48, 48, 3),
    "side_1.conv": (32, 16, 1), "pre_dense_3.conv": (48, 32, 1),
    "up_block_1.features.0": (1, 16, 1), "up_block_1.features.2": (1, 1, 2),
    "up_block_2.features.0": (1, 32, 1), "up_block_2.features.2": (1, 1, 2),
    "up_block_3.features.0": (16, 48, 1), "up_block_3.features.2": (16, 16, 4),
    "up_block_3.features.3": (1, 16, 1), "up_block_3.features.5": (1, 1, 4),
    "block_cat.DWconv1": (24, 1, 3), "block_cat.DWconv2": (24, 1, 3),
}


def teed_state(*, seed: int = 0) -> dict:
    """7_model.pth's tensors, random (Xavier-scaled, as the authors initialise, with small biases)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (a, b, k) in _TEED_SHAPES.items():
        fan = (a + b) * k * k
        state[key + ".weight"] = torch.randn(a, b, k, k, generator=g) * (2.0 / fan) ** 0.5
        state[key + ".bias"] = torch.randn(a, generator=g) * 0.05
    return state


def manga_line_state(*, widths=(2, 4, 8, 16, 32), head: int = 4, seed: int = 0, gain: float = 0.6) -> dict:
    """erika.pth's tensors, random; `widths=None`: the released widths. Convolutions are scaled so the 44
    residual blocks keep the output in the hundreds, and the last bias centres it on 128 (a grey map)."""
    from darkroom.control.annotators.manga_line import HEAD_WIDTH, WIDTHS, MangaLineNet

    net = MangaLineNet(WIDTHS if widths is None else widths, HEAD_WIDTH if widths is None else head)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 1 + torch.rand(value.shape, generator=g)
        elif value.ndim == 4:
            fan = value.shape[1] * value.shape[2] * value.shape[3]
            state[key] = torch.randn(value.shape, generator=g) * (gain / fan ** 0.5)
        elif key.endswith(".weight"):  # batch-norm scales
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
    state["conv15.model.2.bias"] = torch.full((1,), 128.0)
    return state


def random_state(template: dict, *, seed: int = 0, variance: float = 1.0) -> dict:
    """Random tensors shaped as `template` (a module's state dict), for nets with batch norm: convolutions
    with variance / fan-in, batch-norm variances in [1, 2), other vectors small, batch counters kept."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 1 + torch.rand(value.shape, generator=g)
        elif value.ndim == 4:
            state[key] = torch.randn(value.shape, generator=g) * (variance / value[0].numel()) ** 0.5
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
    return state


def lama_state(*, width: int = 8, blocks: int = 2, seed: int = 0) -> dict:
    """ControlNetLama.pth's tensors (the generator's `model.<i>` keys), random."""
    from darkroom.control.annotators.lama import LamaGenerator

    return random_state(LamaGenerator(width, blocks).state_dict(), seed=seed)


def anime_face_state(*, seed: int = 0) -> dict:
    """UNet.pth's tensors at the released size (1.55 M weights: MobileNetV2's features 0-16 and the decoder),
    random."""
    from darkroom.control.annotators.anime_face import AnimeFaceUNet

    return random_state(AnimeFaceUNet().state_dict(), seed=seed, variance=2.0)


def leres_file_state(*, blocks=(1, 1, 1, 1), groups: int = 2, group_width: int = 8, stem: int = 8, mid: int = 16,
                     seed: int = 0) -> dict:
    """res101.pth's layout, narrow (the released file: ResNeXt-101 32x8d, blocks (3, 4, 23, 3), stem 64, decoder
    256): {"depth_model": {"depth_model.<key>": tensor}}, random."""
    from darkroom.control.annotators.leres import LeReS

    state = random_state(LeReS(blocks, groups, group_width, stem, mid).state_dict(), seed=seed)
    return {"depth_model": {"depth_model." + k: v for k, v in state.items()}}


def _zoe_original_name(key: str) -> str | None:
    """A transformers ZoeDepth key under the original ZoeD_M12_N.pt name (None: the q/k/v parts, fused apart)."""
    import re

    beit, scratch = "core.core.pretrained.model.", "core.core.scratch."
    if key == "backbone.beit.embeddings.cls_token":
        return beit + "cls_token"
    if key.startswith("backbone.beit.embeddings.patch_embeddings.projection."):
        return beit + "patch_embed.proj." + key.rsplit(".", 1)[1]
    m = re.match(r"backbone\.beit\.layers\.(\d+)\.(.+)$", key)
    if m:
        i, rest = m.groups()
        if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            return None
        rest = (rest.replace("attention.o_proj", "attn.proj").replace("layernorm_before", "norm1")
                .replace("layernorm_after", "norm2").replace("lambda_1", "gamma_1").replace("lambda_2", "gamma_2")
                .replace("relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"))
        return f"{beit}blocks.{i}.{rest}"
    m = re.match(r"neck\.reassemble_stage\.readout_projects\.(\d+)\.0\.(\w+)$", key)
    if m:
        return f"core.core.pretrained.act_postprocess{int(m[1]) + 1}.0.project.0.{m[2]}"
    m = re.match(r"neck\.reassemble_stage\.layers\.(\d+)\.(projection|resize)\.(\w+)$", key)
    if m:
        return f"core.core.pretrained.act_postprocess{int(m[1]) + 1}.{3 if m[2] == 'projection' else 4}.{m[3]}"
    m = re.match(r"neck\.convs\.(\d+)\.weight$", key)
    if m:
        return f"{scratch}layer{int(m[1]) + 1}_rn.weight"
    m = re.match(r"neck\.fusion_stage\.layers\.(\d+)\.(.+)$", key)
    if m:
        rest = (m[2].replace("projection", "out_conv").replace("residual_layer", "resConfUnit")
                .replace("convolution", "conv"))
        return f"{scratch}refinenet{4 - int(m[1])}.{rest}"
    m = re.match(r"relative_head\.conv(\d)\.(\w+)$", key)
    if m:
        return f"{scratch}output_conv.{2 * (int(m[1]) - 1)}.{m[2]}"
    if key.startswith("metric_head."):
        rest = key[len("metric_head."):]
        if not rest.startswith(("conv2.", "conditional_log_binomial.")):
            rest = rest.replace("conv1.", "_net.0.").replace("conv2.", "_net.2.")
        return rest
    raise KeyError(key)


def zoe_config(*, tiny: bool = True):
    """A ZoeDepthConfig: tiny (a 4-block BEiT of width 32 on a 4 x 4 window, narrow neck and head) or ZoeD_N's."""
    from transformers import BeitConfig, ZoeDepthConfig

    if not tiny:
        backbone = BeitConfig(image_size=384, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                              num_attention_heads=16, intermediate_size=4096, use_relative_position_bias=True,
                              reshape_hidden_states=False, layer_norm_eps=1e-6,
                              out_features=["stage6", "stage12", "stage18", "stage24"])
        return ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[256, 512, 1024, 1024])
    backbone = BeitConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=64, use_relative_position_bias=True, reshape_hidden_states=False,
                          layer_norm_eps=1e-6, out_features=["stage1", "stage2", "stage3", "stage4"])
    return ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                          bottleneck_features=16, bin_embedding_dim=8, num_attractors=[4, 4, 2, 1],
                          bin_configurations=[{"n_bins": 8, "min_depth": 1e-3, "max_depth": 10.0}])


def zoe_file_state(model) -> dict:
    """A transformers ZoeDepth's weights in ZoeD_M12_N.pt's layout ({"model": {original name: tensor}}), with
    the original's position indices and classifier, which Darkroom drops."""
    hidden = model.config.backbone_config.hidden_size
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        name = _zoe_original_name(key)
        if name is not None:
            out[name] = value
    beit = "core.core.pretrained.model."
    for i in range(model.config.backbone_config.num_hidden_layers):
        att = f"backbone.beit.layers.{i}.attention."
        out[f"{beit}blocks.{i}.attn.qkv.weight"] = torch.cat([state[att + p + ".weight"] for p in
                                                              ("q_proj", "k_proj", "v_proj")])
        out[f"{beit}blocks.{i}.attn.q_bias"] = state[att + "q_proj.bias"]
        out[f"{beit}blocks.{i}.attn.v_bias"] = state[att + "v_proj.bias"]
        out[f"{beit}blocks.{i}.attn.relative_position_index"] = torch.zeros(2, 2, dtype=torch.long)
    out[beit + "head.weight"] = torch.zeros(3, hidden)
    return {"model": out}


def dsine_state(*, seed: int = 0) -> dict:
    """dsine.pt's tensors ({"model": ...} is how the file keeps them) on a narrow EfficientNet, random."""
    from darkroom.control.annotators.dsine import DSINE
    from darkroom.control.annotators.normalbae import Spec

    return random_state(DSINE(Spec(8, _tiny_effnet_stages(), 32, (0, 0, 0, 0), 0)).state_dict(), seed=seed)
