"""PyInstaller hook for Darkroom (used by `darkroom bundle create --portable`, see darkroom/carry/portable.py).

Darkroom's package data (starter model, tokenizer, configs, web UI, bundle scripts) and every runtime
submodule (commands and routers are imported lazily); the test builders and the starter model's training
code stay out.
"""

from PyInstaller.utils.hooks import can_import_module, collect_data_files, collect_submodules, copy_metadata

_DEV = ("darkroom.testing", "darkroom.starter_training")

hiddenimports = collect_submodules("darkroom", filter=lambda name: not name.startswith(_DEV))
# diffusers and transformers resolve their classes lazily (importlib), out of PyInstaller's sight; samplers are
# looked up by name (getattr(diffusers, "EulerDiscreteScheduler"))
for _package in ("diffusers.models", "diffusers.schedulers", "diffusers.loaders", "transformers.models.clip",
                 # the ControlNet preprocessors' depth nets and their backbones (darkroom/control/annotators)
                 "transformers.models.depth_anything", "transformers.models.dinov2", "transformers.models.dpt",
                 "transformers.models.bit", "transformers.models.zoedepth", "transformers.models.beit",
                 # OneFormer (seg_ofade20k, seg_ofcoco) and its Swin backbone
                 "transformers.models.oneformer", "transformers.models.swin"):
    hiddenimports += collect_submodules(_package)
for _optional in ("spandrel", "spandrel_extra_arches"):  # upscalers and face restoration, when installed
    if can_import_module(_optional):
        hiddenimports += collect_submodules(_optional)
datas = collect_data_files("darkroom", excludes=["testing/**", "starter_training/**", "**/__pycache__/**"])
# diffusers and transformers ask importlib.metadata which packages are installed
datas += copy_metadata("darkroom", recursive=True)
